"""A procedural LAION-format corpus whose images follow their captions, and the classifier that checks them."""

from ldm.synthetic.classify import classify
from ldm.synthetic.render import encode_jpeg, render
from ldm.synthetic.scene import Scene, all_scenes, caption, parse_caption

__all__ = ["Scene", "all_scenes", "caption", "classify", "encode_jpeg", "parse_caption", "render"]
