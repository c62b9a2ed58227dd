"""Tools beside the optimizers: the ``sam-fused`` command line (``bench``, ``compare``) and the
sharpness measurements (Hessian spectrum, trace, loss landscapes) in ``sharpness``."""
