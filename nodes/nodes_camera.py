"""Camera nodes: build, inspect, convert and preview ``NVS_CAMERA`` batches."""
from __future__ import annotations

import json
import math

from ..nvs_core import cameras as cam
from ..nvs_core.preview import draw_cameras

from .common import CAMERA, float_input, int_input, parse_indices, size_inputs

CATEGORY = "NVS/camera"


def _elevation(default=0.0):
    return float_input(default, -90.0, 90.0, 0.5, "Degrees above (+) or below (-) the target.")


def _radius():
    return float_input(2.0, 0.01, 1000.0, 0.01, "Distance from the camera to the target (scene units).")


def _fov():
    return float_input(40.0, 1.0, 179.0, 0.5, "Vertical field of view in degrees.")


def _check_fov_radius(fov: float, radius: float) -> None:
    if not 0.0 < fov < 180.0:
        raise ValueError(f"fov must be between 0 and 180 degrees (exclusive), got {fov}")
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")


class NVSCamera:
    DESCRIPTION = ("One camera on a sphere looking at the origin. Azimuth 0 is on +Z; positive azimuth turns "
                   "counter-clockwise seen from above (+90 = on +X); +Y is up in the image.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("A batch of one camera.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "elevation": _elevation(),
            "azimuth": float_input(0.0, -360.0, 360.0, 0.5, "Degrees around the vertical axis; 0 = on +Z, +90 = on +X."),
            "radius": _radius(),
            "fov": _fov(),
            **size_inputs(),
        }}

    def build(self, elevation, azimuth, radius, fov, width, height):
        _check_fov_radius(fov, radius)
        return (cam.Cameras.from_spherical(math.radians(elevation), math.radians(azimuth), radius,
                                           math.radians(fov), width, height),)


class NVSOrbitCameras:
    DESCRIPTION = ("A ring of cameras at one elevation looking at the origin. A 360 degree sweep closes the "
                   "orbit without repeating the first view; other sweeps include both ends.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("count cameras, in orbit order.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "count": int_input(8, 1, 1024, "Number of cameras."),
            "elevation": _elevation(15.0),
            "azimuth_start": float_input(0.0, -360.0, 360.0, 0.5, "Azimuth of the first camera (degrees)."),
            "azimuth_sweep": float_input(360.0, -720.0, 720.0, 0.5, "Degrees covered by the orbit; negative turns clockwise."),
            "radius": _radius(),
            "fov": _fov(),
            **size_inputs(),
        }}

    def build(self, count, elevation, azimuth_start, azimuth_sweep, radius, fov, width, height):
        _check_fov_radius(fov, radius)
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        return (cam.orbit(count, math.radians(elevation), math.radians(azimuth_start), math.radians(azimuth_sweep),
                          radius, math.radians(fov), width, height),)


class NVSSpiralCameras:
    DESCRIPTION = "Cameras climbing from one elevation to another while circling the origin."
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("count cameras along the spiral.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "count": int_input(24, 2, 1024, "Number of cameras."),
            "elevation_start": _elevation(-10.0),
            "elevation_end": _elevation(40.0),
            "turns": float_input(1.0, -10.0, 10.0, 0.05, "Full turns around the vertical axis."),
            "azimuth_start": float_input(0.0, -360.0, 360.0, 0.5, "Azimuth of the first camera (degrees)."),
            "radius": _radius(),
            "fov": _fov(),
            **size_inputs(),
        }}

    def build(self, count, elevation_start, elevation_end, turns, azimuth_start, radius, fov, width, height):
        _check_fov_radius(fov, radius)
        return (cam.spiral(count, math.radians(elevation_start), math.radians(elevation_end), turns, radius,
                           math.radians(fov), width, height, azimuth_start=math.radians(azimuth_start)),)


class NVSCameraTrajectory:
    DESCRIPTION = ("A smooth path through key cameras (in batch order): rotations are slerped, positions and "
                   "intrinsics interpolated linearly.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("count cameras along the path, starting and ending at the first and last key.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "keyframes": (CAMERA, {"tooltip": "Key cameras (at least 2), visited in batch order."}),
            "count": int_input(24, 2, 4096, "Number of cameras on the path."),
        }}

    def build(self, keyframes, count):
        return (cam.interpolate(keyframes, count),)


class NVSCameraInfo:
    DESCRIPTION = ("Cameras as JSON: {width, height, cameras: [{c2w: 4x4, K: 3x3 pixels}]} with OpenCV camera "
                   "axes (x right, y down, z forward) and a +Y-up world.")
    CATEGORY = CATEGORY
    FUNCTION = "describe"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("json",)
    OUTPUT_TOOLTIPS = ("The cameras as JSON text; NVS Camera From JSON reads it back.",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"cameras": (CAMERA, {"tooltip": "Cameras to describe."})}}

    def describe(self, cameras):
        text = json.dumps(cameras.to_dict())
        return {"ui": {"text": [text]}, "result": (text,)}


class NVSCameraFromJSON:
    DESCRIPTION = ("Cameras from JSON: our format ({width, height, convention?, cameras: [{c2w | w2c | P, K | fov}]}, "
                   "convention opencv/opengl/blender) or a list of 3x4 projection matrices.")
    CATEGORY = CATEGORY
    FUNCTION = "parse"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("The parsed cameras.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "camera_json": ("STRING", {"multiline": True, "default": "", "tooltip": "Camera JSON text (see the node description); NVS Camera Info writes this format."}),
            **size_inputs(),
        }}

    def parse(self, camera_json, width, height):
        try:
            data = json.loads(camera_json)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"camera_json: not valid JSON ({exc})") from None
        return (cam.cameras_from_dict(data, width, height),)


class NVSCameraBatch:
    DESCRIPTION = "Concatenate two camera batches and/or select cameras by index ('0, 2, 5-7, -1'; empty = all)."
    CATEGORY = CATEGORY
    FUNCTION = "batch"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("The concatenated and selected cameras.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "cameras": (CAMERA, {"tooltip": "First camera batch."}),
            "select": ("STRING", {"default": "", "tooltip": "Indices into the concatenated batch: '0, 2, 5-7, -1'. Empty keeps all."}),
        }, "optional": {
            "cameras_2": (CAMERA, {"tooltip": "Optional second batch appended after the first."}),
        }}

    def batch(self, cameras, select, cameras_2=None):
        merged = cam.Cameras.cat([cameras, cameras_2]) if cameras_2 is not None else cameras
        return (merged[parse_indices(select, len(merged), "select")],)


class NVSRelativeCameras:
    DESCRIPTION = "Express every camera relative to a reference camera, which becomes the identity pose."
    CATEGORY = CATEGORY
    FUNCTION = "relative"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("Cameras in the reference camera's frame (OpenCV axes).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "cameras": (CAMERA, {"tooltip": "Cameras to re-express."}),
            "reference_index": int_input(0, -4096, 4096, "Index of the reference camera in 'cameras' (ignored when 'reference' is connected)."),
        }, "optional": {
            "reference": (CAMERA, {"tooltip": "A single reference camera from elsewhere."}),
        }}

    def relative(self, cameras, reference_index, reference=None):
        if reference is not None:
            if len(reference) != 1:
                raise ValueError(f"reference: expected a single camera, got {len(reference)}")
            return (cameras.relative_to(reference),)
        if not -len(cameras) <= reference_index < len(cameras):
            raise ValueError(f"reference_index {reference_index} is out of range for {len(cameras)} cameras")
        return (cameras.relative_to(reference_index % len(cameras)),)


class NVSCameraFromLoad3D:
    DESCRIPTION = ("Convert the camera of ComfyUI's Load 3D viewer (LOAD3D_CAMERA: position, target, zoom) into "
                   "an NVS camera. The viewer's field of view is not in that data, so give it here.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = (CAMERA,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("One camera matching the 3D viewer's view.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "camera_info": ("LOAD3D_CAMERA", {"tooltip": "camera_info output of the Load 3D node."}),
            "fov": float_input(35.0, 1.0, 179.0, 0.5, "Vertical field of view of the 3D viewer in degrees (three.js default 35)."),
            **size_inputs(),
        }}

    def convert(self, camera_info, fov, width, height):
        if not isinstance(camera_info, dict):
            raise ValueError(f"camera_info: expected the Load 3D camera dict, got {type(camera_info).__name__}")
        _check_fov_radius(fov, 1.0)
        return (cam.cameras_from_load3d(camera_info, math.radians(fov), width, height),)


class NVSCameraPreview:
    DESCRIPTION = ("Draw the cameras as frustums (first camera bold, small triangle = image up), their path, and the "
                   "world axes (X red, Y green, Z blue) seen from an outside viewpoint.")
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("A square preview image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "cameras": (CAMERA, {"tooltip": "Cameras to draw."}),
            "viewer_elevation": float_input(30.0, -90.0, 90.0, 1.0, "Elevation of the preview viewpoint (degrees)."),
            "viewer_azimuth": float_input(30.0, -360.0, 360.0, 1.0, "Azimuth of the preview viewpoint (degrees)."),
            "size": int_input(512, 64, 2048, "Preview size in pixels.", step=8),
            "frustum_scale": float_input(0.15, 0.01, 1.0, 0.01, "Frustum depth relative to the extent of the cameras."),
        }}

    def preview(self, cameras, viewer_elevation, viewer_azimuth, size, frustum_scale):
        return (draw_cameras(cameras, math.radians(viewer_elevation), math.radians(viewer_azimuth), size,
                             frustum_scale),)


NODE_CLASS_MAPPINGS = {
    "NVSCamera": NVSCamera,
    "NVSOrbitCameras": NVSOrbitCameras,
    "NVSSpiralCameras": NVSSpiralCameras,
    "NVSCameraTrajectory": NVSCameraTrajectory,
    "NVSCameraInfo": NVSCameraInfo,
    "NVSCameraFromJSON": NVSCameraFromJSON,
    "NVSCameraBatch": NVSCameraBatch,
    "NVSRelativeCameras": NVSRelativeCameras,
    "NVSCameraFromLoad3D": NVSCameraFromLoad3D,
    "NVSCameraPreview": NVSCameraPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NVSCamera": "NVS Camera",
    "NVSOrbitCameras": "NVS Orbit Cameras",
    "NVSSpiralCameras": "NVS Spiral Cameras",
    "NVSCameraTrajectory": "NVS Camera Trajectory",
    "NVSCameraInfo": "NVS Camera Info",
    "NVSCameraFromJSON": "NVS Camera From JSON",
    "NVSCameraBatch": "NVS Camera Batch",
    "NVSRelativeCameras": "NVS Relative Cameras",
    "NVSCameraFromLoad3D": "NVS Camera From Load3D",
    "NVSCameraPreview": "NVS Camera Preview",
}
