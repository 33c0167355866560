"""What every stage runs on: device and precision, data-parallel processes, atomic files and checkpoints, progress."""
