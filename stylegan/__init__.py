"""GenForce's StyleGAN (generator and discriminator) with GenForce's state-dict names, and its checkpoint loader."""
