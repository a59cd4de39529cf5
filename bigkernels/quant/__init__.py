"""Quantisation recipes: absmax scales, SmoothQuant calibration, quantize_(); weight sharing
(1-D k-means codebooks), share_weights_()."""
from bigkernels.quant.codebook import kmeans_1d, share_weights_
from bigkernels.quant.quantize import calibrate_input_absmax, quantize_, smoothquant_scale

__all__ = ["calibrate_input_absmax", "kmeans_1d", "quantize_", "share_weights_", "smoothquant_scale"]
