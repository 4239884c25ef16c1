"""Image-quality metrics between generated and ground-truth views."""
from __future__ import annotations

from ..nvs_core import metrics

from . import host
from .common import check_image, check_mask

CATEGORY = "NVS/metrics"


class NVSMetrics:
    DESCRIPTION = ("PSNR and SSIM per image (masked DTU protocol when a mask is given: mask > 0.01 counts, "
                   "masked MSE over all channels, SSIM on masked images) and LPIPS-VGG when its weights are in "
                   "models/nvs/lpips/ (never downloaded).")
    CATEGORY = CATEGORY
    FUNCTION = "measure"
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("psnr", "ssim", "lpips", "mean_psnr", "mean_ssim", "table")
    OUTPUT_IS_LIST = (True, True, True, False, False, False)
    OUTPUT_TOOLTIPS = ("PSNR of each image (dB).", "SSIM of each image.",
                       "LPIPS of each image (empty list when LPIPS is off).", "Mean PSNR over the batch.",
                       "Mean SSIM over the batch.", "A text table of all values.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prediction": ("IMAGE", {"tooltip": "Generated images."}),
            "ground_truth": ("IMAGE", {"tooltip": "Reference images of the same size and count."}),
            "lpips": ("BOOLEAN", {"default": False, "tooltip": "Also compute LPIPS-VGG; needs vgg16-397923af.pth and "
                                  "vgg.pth (LPIPS v0.1) in models/nvs/lpips/."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Region to evaluate (1 = object). One mask applies to every image."}),
        }}

    def measure(self, prediction, ground_truth, lpips, mask=None):
        prediction = check_image(prediction, "prediction")
        ground_truth = check_image(ground_truth, "ground_truth")
        if prediction.shape != ground_truth.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and ground_truth {tuple(ground_truth.shape)} "
                             "must have the same batch size and image size")
        b, h, w, _ = prediction.shape
        mask = check_mask(mask, "mask", b, h, w)
        model = None
        if lpips:
            try:
                model = metrics.load_lpips(host.model_folders("lpips"), device=host.compute_device())
            except metrics.LPIPSUnavailable as exc:
                raise ValueError(f"lpips: {exc}") from None
        result = metrics.compute_metrics(prediction, ground_truth, mask, lpips_model=model)
        table = metrics.format_table(result)
        return {"ui": {"text": [table]},
                "result": (result["psnr"], result["ssim"], result.get("lpips", []), result["psnr_mean"],
                           result["ssim_mean"], table)}


NODE_CLASS_MAPPINGS = {"NVSMetrics": NVSMetrics}
NODE_DISPLAY_NAME_MAPPINGS = {"NVSMetrics": "NVS Metrics"}
