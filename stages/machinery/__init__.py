"""What the commands share: run directories, the training scaffold, devices, inference."""
