"""The tasks: what is task-specific from the config to the service's answer, behind one interface (`base`)."""
