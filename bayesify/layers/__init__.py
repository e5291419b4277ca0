"""Plain nn.Modules, usable alone: VBLL heads, Bayesian linear/conv layers, GP heads.

Keep this file a list of imports; each layer family appends its own.
"""
# ruff: noqa: F401  (re-exports)

from bayesify.layers.bayesian import BayesianConv2d, BayesianLinear, sampling_mode
from bayesify.layers.gp import ExactGPHead, VariationalGPHead
from bayesify.layers.vbll_classification import VBLLDiscriminative, VBLLGenerative
from bayesify.layers.vbll_covariance import VBLLCovariance
from bayesify.layers.vbll_regression import VBLLRegression

