"""``mpvg analyze``'s library: token/PE correlation per layer, heatmaps, last-LayerNorm statistics and
position-correlation maps of trained models, written as PNG, JSON and Markdown.

Modules, in the order the data flows:

- :mod:`.stats`: the numbers on plain tensors (Pearson token/PE correlation, cosine maps, parameter statistics);
- :mod:`.collect`: what one model exposes (:class:`ModelSpec`, :class:`Intermediates`), which figure applies to
  which PE mode, the measurements over a set of images (:func:`analyze_model`) and their JSON form;
- :mod:`.plots`: the matplotlib figures;
- :mod:`.report`: the Markdown table, writing every output, and :func:`run_analysis` (what ``mpvg analyze`` calls).

May import ops, layers and models (checkpoints and devices: :mod:`mpvg_kernels.models.factory`,
:mod:`mpvg_kernels.device`); from training only its data sets, for the held-out images. Needs matplotlib (the
``[train]`` extra).
"""

from .collect import (
    CORRELATION_DEFINITION,
    FIGURES,
    Intermediates,
    ModelAnalysis,
    ModelSpec,
    NotApplicableError,
    analysis_to_json,
    analyze_model,
    check_applicable,
    collect_intermediates,
    describe_model,
    figure_applies,
    pe_bias_c,
    pos_map_terms,
)
from .plots import plot_correlation, plot_heatmaps, plot_last_ln_heatmaps, plot_last_ln_params, plot_pos_maps
from .report import AnalysisReport, correlation_table, load_eval_images, run_analysis, write_outputs
from .stats import (
    cosine,
    default_layers,
    default_ref_token,
    mean_pairwise_cosine,
    position_correlation,
    position_correlation_map,
    token_pe_correlation,
    vector_stats,
)

__all__ = [
    "CORRELATION_DEFINITION",
    "FIGURES",
    "AnalysisReport",
    "Intermediates",
    "ModelAnalysis",
    "ModelSpec",
    "NotApplicableError",
    "analysis_to_json",
    "analyze_model",
    "check_applicable",
    "collect_intermediates",
    "correlation_table",
    "cosine",
    "default_layers",
    "default_ref_token",
    "describe_model",
    "figure_applies",
    "load_eval_images",
    "mean_pairwise_cosine",
    "pe_bias_c",
    "plot_correlation",
    "plot_heatmaps",
    "plot_last_ln_heatmaps",
    "plot_last_ln_params",
    "plot_pos_maps",
    "pos_map_terms",
    "position_correlation",
    "position_correlation_map",
    "run_analysis",
    "token_pe_correlation",
    "vector_stats",
    "write_outputs",
]
