"""Analyses of adapters and fine-tuned models: update spectra and effective rank (Roy & Vetterli 2007), subspace
similarity (Hu et al. 2021), intruder dimensions and their mitigation (Shuttleworth et al. 2024), the norms of
LoRA's computational limits (Hu et al. 2024), and low-rank matrix completion by robust alternating minimisation
(Gu et al. 2024)."""
from .altmin import complete
from .intruders import IntruderReport, ModelIntruders, intruder_dimensions, mitigate, model_intruders
from .limits import LayerNorms, NormMonitor, norm_report
from .plots import plot_intruders, plot_spectra
from .spectrum import (
    LayerSpectrum,
    Update,
    adapter_similarity,
    dense_update,
    effective_rank,
    layer_updates,
    principal_angles,
    singular_values,
    spectra,
    spectrum_report,
    subspace_similarity,
    weight_differences,
    weight_pairs,
)

__all__ = [
    "IntruderReport", "LayerNorms", "LayerSpectrum", "ModelIntruders", "NormMonitor", "Update", "adapter_similarity",
    "complete", "dense_update", "effective_rank", "intruder_dimensions", "layer_updates", "mitigate",
    "model_intruders", "norm_report", "plot_intruders", "plot_spectra", "principal_angles", "singular_values",
    "spectra", "spectrum_report", "subspace_similarity", "weight_differences", "weight_pairs",
]
