"""DTU nodes: load a DTU Rectified scan with its calibration cameras, and evaluate novel views with the
published ViewNeTI protocol."""
from __future__ import annotations

import json
import os

import torch

from ..nvs_core import dtu

from . import host
from .common import CAMERA, MULTIVIEW, check_image, int_input

VIEW_CHOICES = {
    "subset 1 (cam 25)": 1, "subset 3": 3, "subset 6": 6, "train (subset 9)": "train", "test (25 views)": "test",
    "all (34 views)": "all", "subset -1 (12..35)": -1, "subset -2": -2, "subset -3": -3, "custom ids": None,
}
LIGHTS = ["3", "0", "1", "2", "4", "5", "6", "max"]
TRAIN_SUBSETS = {"none": None, "1": 1, "3": 3, "6": 6, "9": 9}


def _folder(path: str, what: str, required: bool = True):
    path = path.strip()
    if not path:
        if required:
            raise ValueError(f"{what}: give a folder path")
        return None
    if os.path.isabs(path):
        return path
    candidate = os.path.join(host.input_directory(), path)
    return candidate if os.path.isdir(candidate) or not os.path.isdir(path) else path


def _ids(text: str, what: str):
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what}: expected 0-based DTU camera ids like '22, 25, 28', got {text!r}") from None
    if not ids:
        raise ValueError(f"{what}: give at least one camera id")
    return ids


class NVSLoadDTUScan:
    DESCRIPTION = ("Load views of a DTU scan (Rectified images rect_{k+1:03d}_{light}_r5000.png) with cameras from the "
                   "DTU calibration (Calibration/cal18/pos_{k+1:03d}.txt) and optional RegNeRF idrmasks. Views use "
                   "the published splits (RegNeRF/ViewNeTI): subsets 1/3/6/9 of the train ids, the 25 test views, "
                   "or all 34. Images are resized with PIL bicubic, 512x384 as in ViewNeTI training. The "
                   "multiview's view names 'scan{ID}_cam{k}' keep the 0-based DTU camera ids.")
    CATEGORY = "NVS/io"
    FUNCTION = "load"
    RETURN_TYPES = (MULTIVIEW, "IMAGE", "MASK", CAMERA)
    RETURN_NAMES = ("multiview", "images", "masks", "cameras")
    OUTPUT_TOOLTIPS = ("Images, masks, cameras and DTU view ids together.", "The views, in camera-id order.",
                       "Object masks (all ones without a masks folder or mask file).",
                       "Cameras from the calibration projections (our +Y-up world, millimetres).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "root": ("STRING", {"default": "", "tooltip": "DTU folder holding Rectified/scan{ID}/ and Calibration/cal18/ "
                                "(relative paths are looked up in ComfyUI's input folder)."}),
            "scan": int_input(114, 1, 999, "DTU scan number (the 15 test scans: 8 21 30 31 34 38 40 41 45 55 63 82 "
                              "103 110 114)."),
            "views": (list(VIEW_CHOICES), {"default": "subset 3", "tooltip": "Which cameras: a ViewNeTI training "
                      "subset (1/3/6/9 = first ids of 25, 22, 28, 40, 44, 48, 0, 8, 13), the 25 test views, all 34, "
                      "or 'custom ids' from view_ids."}),
            "light": (LIGHTS, {"default": "3", "tooltip": "Lighting index in the file names (ViewNeTI uses 3)."}),
            "width": int_input(512, 0, 1600, "Width after resizing (0 with height 0 keeps 1600x1200)."),
            "height": int_input(384, 0, 1200, "Height after resizing (0 with width 0 keeps 1600x1200)."),
        }, "optional": {
            "view_ids": ("STRING", {"default": "", "tooltip": "For 'custom ids': 0-based camera ids, e.g. '22, 25, 28' "
                                    "(file numbers are id + 1)."}),
            "calibration_folder": ("STRING", {"default": "", "tooltip": "Folder with pos_001.txt ... pos_064.txt; "
                                              "empty uses <root>/Calibration/cal18."}),
            "masks_folder": ("STRING", {"default": "", "tooltip": "RegNeRF idrmasks folder (scan{ID}/mask/000.png); "
                                        "empty gives all-ones masks."}),
        }}

    def load(self, root, scan, views, light, width, height, view_ids="", calibration_folder="", masks_folder=""):
        if views not in VIEW_CHOICES:
            raise ValueError(f"views must be one of {list(VIEW_CHOICES)}, got {views!r}")
        selection = VIEW_CHOICES[views]
        if selection is None:
            selection = _ids(view_ids, "view_ids")
        if (width == 0) != (height == 0):
            raise ValueError(f"width and height: give both (or both 0 for the native 1600x1200), got {width}x{height}")
        size = None if width == 0 else (width, height)
        calib = _folder(calibration_folder, "calibration_folder", required=False)
        masks = _folder(masks_folder, "masks_folder", required=False)
        views_mv = dtu.load_dtu_scan(_folder(root, "root"), scan, views=selection, light=light, size=size,
                                     calibration=calib, masks=masks)
        device = host.intermediate_device()
        mask = views_mv.masks if views_mv.masks is not None else torch.ones(views_mv.images.shape[:3])
        return views_mv, views_mv.images.to(device), mask.to(device), views_mv.cameras


class NVSDTUEvaluate:
    DESCRIPTION = ("Evaluate predicted views with ViewNeTI's published DTU protocol: everything at 400x300 "
                   "(predictions bicubic; ground truth 1600x1200 -> 768x576 -> 400x300 when a DTU root is given), "
                   "binary masks (> 0.01, missing = all ones), masked PSNR (MSE summed over channels / mask sum) and "
                   "SSIM on masked images, LPIPS-VGG when vgg16-397923af.pth and vgg.pth are in models/nvs/lpips/ "
                   "(otherwise reported as unavailable).")
    CATEGORY = "NVS/metrics"
    FUNCTION = "evaluate"
    RETURN_TYPES = ("STRING", "STRING", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("table", "summary_json", "mean_psnr", "mean_ssim", "mean_lpips")
    OUTPUT_TOOLTIPS = ("Per-view table with the means.", "All numbers as JSON.", "Mean masked PSNR (dB).",
                       "Mean masked SSIM.", "Mean LPIPS (NaN when LPIPS is unavailable or off).")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prediction": ("IMAGE", {"tooltip": "Predicted views, one per ground-truth view, in the same order."}),
            "ground_truth": (MULTIVIEW, {"tooltip": "Ground-truth views (e.g. from NVS Load DTU Scan); its masks are "
                             "used unless masks_folder is given."}),
            "lpips": ("BOOLEAN", {"default": True, "tooltip": "Compute LPIPS-VGG when its weights are in "
                      "models/nvs/lpips/ (never downloaded)."}),
        }, "optional": {
            "dtu_root": ("STRING", {"default": "", "tooltip": "DTU folder: if set, the ground truth is re-read from the "
                         "original 1600x1200 files (published resize chain) for the scan/cameras in the view names."}),
            "masks_folder": ("STRING", {"default": "", "tooltip": "RegNeRF idrmasks folder; replaces the multiview's "
                             "masks (views without a file count fully)."}),
            "light": (LIGHTS, {"default": "3", "tooltip": "Lighting index of the original files (with dtu_root)."}),
            "training_subset": (list(TRAIN_SUBSETS), {"default": "none", "tooltip": "ViewNeTI training subset: adds "
                                "separate means for training and held-out views (the validation numbers)."}),
            "views": (["all", "test", "heldout"], {"default": "all", "tooltip": "Which views to score: all given "
                      "(summarize_dtu: training views included), the 25 standard test views, or those held out from "
                      "training_subset."}),
        }}

    def evaluate(self, prediction, ground_truth, lpips, dtu_root="", masks_folder="", light="3",
                 training_subset="none", views="all"):
        prediction = check_image(prediction, "prediction")
        n = len(ground_truth)
        if prediction.shape[0] != n:
            raise ValueError(f"prediction: {prediction.shape[0]} images for {n} ground-truth views; give one per view")
        ph, pw = prediction.shape[1:3]
        if abs(pw / ph - ground_truth.width / ground_truth.height) > 0.01:
            raise ValueError(f"prediction is {pw}x{ph} but the ground truth is {ground_truth.width}x"
                             f"{ground_truth.height}: the aspect ratios must match")
        if training_subset not in TRAIN_SUBSETS:
            raise ValueError(f"training_subset must be one of {list(TRAIN_SUBSETS)}, got {training_subset!r}")
        subset = TRAIN_SUBSETS[training_subset]
        try:
            ids = dtu.dtu_camera_ids(ground_truth)
            scans = sorted(set(dtu.dtu_scan_ids(ground_truth)))
        except ValueError:
            ids, scans = None, []
        root = _folder(dtu_root, "dtu_root", required=False)
        masks_root = _folder(masks_folder, "masks_folder", required=False)
        if (root or masks_root or views != "all" or subset is not None) and ids is None:
            raise ValueError("ground_truth: its view names carry no DTU camera ids (scan{ID}_cam{k}); dtu_root, "
                             "masks_folder, views and training_subset need a multiview from NVS Load DTU Scan")
        if (root or masks_root) and len(scans) != 1:
            raise ValueError(f"ground_truth: views come from scans {scans}; evaluate one scan at a time")
        labels = ids if ids is not None else list(range(n))
        keep = dtu.select_eval_views(labels, views, subset) if ids is not None else labels
        rows = [labels.index(k) for k in keep]
        pred = dtu.published_resize(prediction[rows])
        if root:
            gt = dtu.load_dtu_eval_ground_truth(root, scans[0], keep, light)
        else:
            gt = dtu.published_resize(ground_truth.images[rows])
        if masks_root:
            masks, _ = dtu.load_dtu_eval_masks(masks_root, scans[0], keep)
        else:
            masks = dtu.binarize_masks(None if ground_truth.masks is None else ground_truth.masks[rows], len(rows))
        model, reason = dtu.find_lpips(lpips, host.model_folders("lpips"), device=host.compute_device())
        result = dtu.dtu_metrics([pred], gt, masks, keep, train_ids=dtu.dtu_subset_ids(subset) if subset else None,
                                 lpips_model=model, lpips_reason=reason)
        table = dtu.format_dtu_table(result)
        summary = {k: v for k, v in result.items() if k not in ("per_seed",)}
        summary["per_view"] = {k: result["per_seed"][0][k] for k in ("psnr", "ssim", "lpips")}
        nan = float("nan")
        return {"ui": {"text": [table]},
                "result": (table, json.dumps(dtu._json_safe(summary)), float(result["psnr"]), float(result["ssim"]),
                           nan if result["lpips"] is None else float(result["lpips"]))}


NODE_CLASS_MAPPINGS = {"NVSLoadDTUScan": NVSLoadDTUScan, "NVSDTUEvaluate": NVSDTUEvaluate}
NODE_DISPLAY_NAME_MAPPINGS = {"NVSLoadDTUScan": "NVS Load DTU Scan", "NVSDTUEvaluate": "NVS DTU Evaluate"}
