"""Multi-view data nodes: the procedural ground-truth scene, building and loading ``NVS_MULTIVIEW``."""
from __future__ import annotations

import os

import torch

from ..nvs_core import multiview as mv
from ..nvs_core import procedural

from . import host
from .common import CAMERA, MULTIVIEW, check_image, check_mask, int_input, seed_input

CATEGORY = "NVS/io"
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "transparent": None}


class NVSProceduralScene:
    DESCRIPTION = ("A random object made of coloured, textured spheres, boxes, cylinders and tori, ray-cast exactly at "
                   "every camera: images, masks and depth with perfect camera ground truth. The same seed always "
                   "gives the same object.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "MASK", MULTIVIEW)
    RETURN_NAMES = ("images", "masks", "multiview")
    OUTPUT_TOOLTIPS = ("One rendered view per camera.", "Object coverage per view (1 = object).",
                       "Images, masks, depth and cameras together.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": seed_input("Scene seed: which random object to build."),
            "cameras": (CAMERA, {"tooltip": "Cameras to render from; the image size is their nominal size."}),
            "background": (list(BACKGROUNDS), {"default": "white", "tooltip": "Background colour; 'transparent' "
                                               "leaves black behind the object and the mask holds the alpha."}),
        }, "optional": {
            "supersampling": int_input(1, 1, 4, "Anti-aliasing: s x s samples per pixel (1 keeps masks and depth exact)."),
        }}

    def render(self, seed, cameras, background, supersampling=1):
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {background!r}")
        scene = procedural.make_scene(seed)
        views = procedural.render_multiview(scene, cameras, background=BACKGROUNDS[background],
                                            samples_per_pixel=supersampling ** 2, progress=host.progress_factory())
        device = host.intermediate_device()
        return views.images.to(device), views.masks.to(device), views


class NVSMultiviewFromImages:
    DESCRIPTION = "Bundle images, their cameras (one per image) and optional masks into an NVS_MULTIVIEW."
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (MULTIVIEW,)
    RETURN_NAMES = ("multiview",)
    OUTPUT_TOOLTIPS = ("The bundled views.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The views (RGBA inputs lose their alpha; give it as mask)."}),
            "cameras": (CAMERA, {"tooltip": "One camera per image, in the same order."}),
        }, "optional": {
            "masks": ("MASK", {"tooltip": "Object masks (1 = object), one per image or one for all."}),
        }}

    def build(self, images, cameras, masks=None):
        images = check_image(images, "images")
        b, h, w, _ = images.shape
        if len(cameras) != b:
            raise ValueError(f"cameras: {len(cameras)} cameras for {b} images; give exactly one camera per image")
        masks = check_mask(masks, "masks", b, h, w)
        return (mv.MultiView(images.float(), cameras, masks=masks),)


class NVSLoadMultiviewFolder:
    DESCRIPTION = ("Load a folder of images with a cameras file: our cameras.json (NVS Camera Info format, with "
                   "optional 'file' per camera) or a NeRF/instant-ngp transforms.json. Relative folders are "
                   "looked up in ComfyUI's input folder.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MULTIVIEW, "IMAGE", "MASK", CAMERA)
    RETURN_NAMES = ("multiview", "images", "masks", "cameras")
    OUTPUT_TOOLTIPS = ("Everything loaded.", "The images in camera order.",
                       "Alpha of each image (all ones without alpha).", "The cameras.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "Folder with images and cameras.json / transforms.json."}),
            "cameras_file": ("STRING", {"default": "", "tooltip": "Camera file name inside the folder; empty finds "
                                        "cameras.json, transforms.json or transforms_train.json."}),
            "background": (["white", "black"], {"default": "white", "tooltip": "Colour behind transparent pixels."}),
        }}

    def load(self, folder, cameras_file, background):
        if not folder.strip():
            raise ValueError("folder: give the path of a folder of images with a cameras file")
        path = folder if os.path.isabs(folder) else os.path.join(host.input_directory(), folder)
        if not os.path.isdir(path) and os.path.isdir(folder):
            path = folder
        views = mv.load_folder(path, cameras_file.strip() or None, background=background)
        masks = views.masks if views.masks is not None else torch.ones(views.images.shape[:3])
        return views, views.images, masks, views.cameras


class NVSMultiviewSplit:
    DESCRIPTION = "Unpack an NVS_MULTIVIEW into images, masks (ones when absent) and cameras."
    CATEGORY = CATEGORY
    FUNCTION = "split"
    RETURN_TYPES = ("IMAGE", "MASK", CAMERA)
    RETURN_NAMES = ("images", "masks", "cameras")
    OUTPUT_TOOLTIPS = ("The images.", "The masks.", "The cameras.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"multiview": (MULTIVIEW, {"tooltip": "Views to unpack."})}}

    def split(self, multiview):
        masks = multiview.masks if multiview.masks is not None else torch.ones(multiview.images.shape[:3])
        return multiview.images, masks, multiview.cameras


NODE_CLASS_MAPPINGS = {
    "NVSProceduralScene": NVSProceduralScene,
    "NVSMultiviewFromImages": NVSMultiviewFromImages,
    "NVSLoadMultiviewFolder": NVSLoadMultiviewFolder,
    "NVSMultiviewSplit": NVSMultiviewSplit,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NVSProceduralScene": "NVS Procedural Scene",
    "NVSMultiviewFromImages": "NVS Multiview From Images",
    "NVSLoadMultiviewFolder": "NVS Load Multiview Folder",
    "NVSMultiviewSplit": "NVS Multiview Split",
}
