"""The `tshsr-pipe` command line: thin click commands over `extract` and `matching`."""
