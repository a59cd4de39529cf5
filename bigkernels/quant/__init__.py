"""Quantisation recipes: absmax scales, SmoothQuant calibration, quantize_()."""
from bigkernels.quant.quantize import calibrate_input_absmax, quantize_, smoothquant_scale

__all__ = ["calibrate_input_absmax", "quantize_", "smoothquant_scale"]
