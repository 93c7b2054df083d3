"""`crucible chaos`: a fault-injection campaign against real `crucible train` runs (issue 24, part 3)."""
