"""The networks: TSHSR (`tshsr`), HMRN (`hmrn`) and the parts they share (encoders, vector similarity,
attention, reasoning layers, the first-stage head). Modules take sizes and built parts, never a config
file, an optimizer or a device."""
