"""kdserve training: distil a ResNet teacher into ResNet18 students and export them for serving.

This package's top level imports nothing heavy: the gateway imports its torch-free modules
(`training.manifest`, `training.imageprep`) without pulling in torch.
"""
