"""One module per inference method; each registers its BayesianModel subclass.

Modules are imported on first use by :func:`bayesify.core.get_method`.
"""
