"""The one training loop (`loop.train`) that every task runs in, its run directory, the hinge loss and the
multi-process (torchrun) machinery."""
