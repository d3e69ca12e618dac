"""Representation analysis: linear probes of pooled token features at chosen blocks and noise levels
(paper App. C, Figure 7), for the EMA weights (SRA's teacher) and the online weights, and PCA pictures
of token features (paper Figure 2, left). `python -m analysis --help`, or `run_probe` from Python."""
from analysis.features import (
    FeatureModel,
    clean_inputs,
    extract_features,
    load_feature_model,
    pool_tokens,
    token_features,
)
from analysis.pca import pca_panels, principal_components, token_pca_rgb
from analysis.probe import LinearProbe, ProbeConfig, top1_accuracy, train_linear_probe
from analysis.report import WEIGHTS, checkpoint_name, make_split, run_probe

__all__ = [
    "FeatureModel",
    "LinearProbe",
    "ProbeConfig",
    "WEIGHTS",
    "checkpoint_name",
    "clean_inputs",
    "extract_features",
    "load_feature_model",
    "make_split",
    "pca_panels",
    "pool_tokens",
    "principal_components",
    "run_probe",
    "token_features",
    "token_pca_rgb",
    "top1_accuracy",
    "train_linear_probe",
]
