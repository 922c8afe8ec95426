"""Input side of vlmkit: prompts, images and videos to model inputs (the image layout is the model family's).

>>> proc = load_processor("owner/checkpoint")             # doctest: +SKIP
>>> prompt = proc.apply_chat_template(
...     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
... )                                                                    # doctest: +SKIP
>>> batch = proc(text=prompt, images=image)                              # doctest: +SKIP
>>> proc.image_cost(image).visual_tokens                                 # doctest: +SKIP
1088
"""

from .checks import CheckedSpec
from .image import ImageCost, ImageSettings
from .processor import Processor, ProcessorOutput, PromptCost, load_processor
from .text import ChatTemplate, SpecWarning, TextTokenizer
from .video import Video, VideoPlan, VideoSampling

__all__ = [
    "ChatTemplate",
    "CheckedSpec",
    "ImageCost",
    "ImageSettings",
    "Processor",
    "ProcessorOutput",
    "PromptCost",
    "SpecWarning",
    "TextTokenizer",
    "Video",
    "VideoPlan",
    "VideoSampling",
    "load_processor",
]
