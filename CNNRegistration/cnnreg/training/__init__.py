"""Training the learned-mode networks (``python -m cnnreg train``): pairs from image files or
synthesised with a known answer, augmentation, data-parallel training, the training loop.

Nothing on the registration path imports this package; it imports the backend's registration
pieces (networks, losses, regularizers, spatial, checkpoint) from the package above.
"""
