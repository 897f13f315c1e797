"""Label Studio labeling configs (XML) and the names the pull step reads back.

Project kinds: ``pairs`` and ``ratings`` (text-to-image: prompt + images), ``edit-pairs`` and ``edit-ratings``
(an edit instruction + 1-3 source images + the edit(s)).

The layout is made for a rater doing hundreds of tasks in a 1280x800 window: the prompt pinned on top with the
keys, the candidates side by side at the height that is left (their real pixel size under each), the choice row
right under them, and Label Studio's region/info/history panels hidden (they mean nothing for a choice).
"""
from __future__ import annotations

from xml.sax.saxutils import quoteattr

from .errors import AnnotationError

KINDS = ("pairs", "ratings", "edit-pairs", "edit-ratings")

PAIRWISE_FROM = "pref"          # <Pairwise name=...>: result value {"selected": "left"|"right"} (a click on an image)
IMAGE_A, IMAGE_B = "img_a", "img_b"
RATING_A, RATING_B = "rating_a", "rating_b"
BOTH_BAD = "both_bad"           # older projects: <Choices name="both_bad">, a checked box means "neither is acceptable"
RATING_FROM = "quality"         # rating project: <Rating name=...> value {"rating": 1..5}
RATING_IMAGE = "image"
# The choice row (<Choices name="verdict">, single choice): keys and buttons for left / right / about the same /
# both bad. The aliases are what a result stores; a verdict wins over an image click in one annotation.
VERDICT = "verdict"
TIE = "tie"
VERDICT_CHOICES = (("left", "\u25c0 Left is better", "1"), ("right", "Right is better \u25b6", "2"),
                   (TIE, "About the same", "3"), (BOTH_BAD, "Both are bad", "4"))
# Edit projects: the source (control) images left of the edit(s), one <Image valueList> for 1-3 of them. Its name
# is what marks a project as an edit project (pull.project_kind).
SOURCES = "sources"
SOURCES_KEY = "control_images"  # task data: list of source URLs (the column name align/data/edit.py reads)
# Task data written by push: each image's pixel size as text ("512 x 512 px"), shown under the image because Label
# Studio scales every image to the space it has.
SIZE_KEYS = {"image_a": "size_a", "image_b": "size_b", "image": "size"}
PAIR_INSTRUCTIONS = "Which image matches the prompt better?"
EDIT_PAIR_INSTRUCTIONS = "Which edit follows the instruction better, keeping the rest of the source image(s)?"
RATING_INSTRUCTIONS = "How well does the image match the prompt?"
EDIT_RATING_INSTRUCTIONS = "How well does the edit follow the instruction, keeping the rest of the source?"

# Layout CSS, put on the page by <Style>. Class names are Label Studio 1.23's (the version server.py pins).
_STYLE = """
.lsf-sidepanels__wrapper_align_right, .lsf-sidepanels__wrapper_align_left, .lsf-outliner, .lsf-panel-tabs,
.lsf-image-view__tools, .lsf-toolbar, .lsf-zoom-panel, .qia-verdict sup { display: none !important; }
.lsf-sidepanels { padding-left: 0 !important; padding-right: 0 !important; }
.qia-prompt { position: sticky; top: 0; z-index: 5; background: #fff; padding: 2px 0 4px;
  border-bottom: 1px solid #ddd; }
.qia-prompt h1, .qia-prompt h2, .qia-prompt h3, .qia-prompt h4, .qia-prompt h5, .qia-prompt h6 {
  margin: 0 !important; }
.qia-keys h1, .qia-keys h2, .qia-keys h3, .qia-keys h4, .qia-keys h5, .qia-keys h6 { font-size: 13px !important;
  line-height: 18px !important; font-weight: normal !important; color: #444; margin: 2px 0 0 !important; }
.qia-row { display: flex; gap: 12px; align-items: flex-start; margin-top: 6px; }
.qia-col { flex: 1 1 0; min-width: 0; }
.qia-sources { flex: 0.7 1 0; min-width: 0; text-align: center; border-right: 2px dashed #bbb; padding-right: 8px; }
.qia-size h1, .qia-size h2, .qia-size h3, .qia-size h4, .qia-size h5, .qia-size h6 { font-size: 12px !important;
  line-height: 16px !important; font-weight: normal !important; color: #666; margin: 2px 0 0 !important; }
.qia-verdict { margin-top: 6px; }
.qia-verdict .ant-radio-wrapper, .qia-verdict .ant-checkbox-wrapper, .qia-verdict label { border: 2px solid #bbb;
  border-radius: 8px; padding: 6px 14px; margin-right: 10px; font-size: 15px; }
.qia-verdict .ant-radio-wrapper-checked, .qia-verdict .ant-checkbox-wrapper-checked,
.qia-verdict label:has(input:checked) { border-color: #16a34a; background: #dcfce7; font-weight: bold; }
"""
# The chosen image: a thick green frame (Label Studio's default is a thin outline, easy to miss).
_SELECTED = "box-shadow: 0 0 0 6px #16a34a, 0 0 0 10px #bbf7d0; border-radius: 4px"
# Images get what is left of the window once Label Studio's bars, the prompt and the choice row are drawn.
_IMAGE_HEIGHT = "calc(100vh - 300px)"


def _prompt_block(key_help: str) -> list[str]:
    """The prompt (or edit instruction) pinned at the top, with the keys, always in view."""
    return ['  <View className="qia-prompt">',
            '    <Header value="$prompt" size="4"/>',
            f'    <View className="qia-keys"><Header value={quoteattr(key_help)} size="6"/></View>',
            "  </View>"]


def _sources_column() -> list[str]:
    """An edit's 1-3 sources (paged by Label Studio when several) in a column left of the edit(s)."""
    return ['    <View className="qia-sources">',
            f'      <Image name="{SOURCES}" valueList="${SOURCES_KEY}" maxWidth="100%" maxHeight="{_IMAGE_HEIGHT}" '
            f'zoomControl="false"/>',
            '      <View className="qia-size"><Header value="source image(s)" size="6"/></View>',
            "    </View>"]


def _image_column(name: str, key: str, extra: list[str] = ()) -> list[str]:
    return ['    <View className="qia-col">',
            f'      <Image name="{name}" value="${key}" maxWidth="100%" maxHeight="{_IMAGE_HEIGHT}" '
            f'zoomControl="false"/>',
            f'      <View className="qia-size"><Header value="${SIZE_KEYS[key]}" size="6"/></View>',
            *extra,
            "    </View>"]


def _style() -> list[str]:
    return ["  <Style>" + _STYLE + "  </Style>"]


def base_kind(kind: str) -> str:
    """``pairs`` or ``ratings``: how the votes are aggregated (an edit project votes like its T2I twin)."""
    return kind.removeprefix("edit-")


def project_kind(label_config: str) -> str:
    """The kind of a project from its labeling config (what push created it with)."""
    if "<Pairwise" in label_config:
        kind = "pairs"
    elif "<Rating" in label_config:
        kind = "ratings"
    else:
        raise AnnotationError("project is neither a pairwise nor a rating project (no <Pairwise>/<Rating> tag)")
    return f"edit-{kind}" if f'name="{SOURCES}"' in label_config else kind


def label_config(kind: str, per_image_rating: bool = False, both_bad: bool = True) -> str:
    edit = kind.startswith("edit-")
    if base_kind(kind) == "pairs":
        return pairwise_config(per_image_rating=per_image_rating, both_bad=both_bad, edit=edit)
    return rating_config(edit=edit)


def pairwise_config(per_image_rating: bool = False, both_bad: bool = True, max_rating: int = 5,
                    instructions: str | None = None, edit: bool = False) -> str:
    """The prompt pinned on top, the two candidates side by side (each with its real pixel size), the choice row.

    A click on an image selects it (``<Pairwise>``, result ``{"selected": "left"|"right"}``); the choice row
    (``verdict``: left / right / about the same / both bad, keys 1-4) does the same from the keyboard.
    Task data keys: ``prompt``, ``image_a`` (left), ``image_b`` (right), ``size_a``/``size_b``; ``edit``: also
    ``control_images`` (1-3 source URLs, in a column left of the edits) and ``prompt`` is the edit instruction.
    """
    if instructions is None:
        instructions = EDIT_PAIR_INSTRUCTIONS if edit else PAIR_INSTRUCTIONS
    choices = [c for c in VERDICT_CHOICES if both_bad or c[0] != BOTH_BAD]
    keys = ", ".join(f"{k} {alias.replace('_', ' ')}" for alias, _, k in choices)
    key_help = f"{instructions} Click an image or press a key: {keys}; Ctrl+Enter submits, Ctrl+Space skips."

    def ratings(name: str, img: str) -> list[str]:
        return [f'      <Rating name="{name}" toName="{img}" maxRating="{max_rating}"/>'] if per_image_rating else []

    lines = [
        "<View>",
        *_style(),
        *_prompt_block(key_help),
        '  <View className="qia-row">',
        *(_sources_column() if edit else []),
        *_image_column(IMAGE_A, "image_a", ratings(RATING_A, IMAGE_A)),
        *_image_column(IMAGE_B, "image_b", ratings(RATING_B, IMAGE_B)),
        "  </View>",
        f'  <Pairwise name="{PAIRWISE_FROM}" toName="{IMAGE_A},{IMAGE_B}" selectionStyle="{_SELECTED}"/>',
        '  <View className="qia-verdict">',
        f'    <Choices name="{VERDICT}" toName="{IMAGE_A}" choice="single" showInline="true">',
        *(f'      <Choice value={quoteattr(f"{label}  [{k}]")} alias="{alias}" hotkey="{k}"/>'
          for alias, label, k in choices),
        "    </Choices>",
        "  </View>",
        "</View>",
    ]
    return "\n".join(lines)


def rating_config(max_rating: int = 5, edit: bool = False, instructions: str | None = None) -> str:
    """The prompt pinned on top, one image with its real size, a required 1-5 star rating. Task data keys:
    ``prompt``, ``image``, ``size``; ``edit``: also ``control_images`` (the 1-3 sources, left of the edit) and
    ``prompt`` is the edit instruction."""
    if instructions is None:
        instructions = EDIT_RATING_INSTRUCTIONS if edit else RATING_INSTRUCTIONS
    key_help = f"{instructions} Click 1 to {max_rating} stars; Ctrl+Enter submits, Ctrl+Space skips."
    stars = [f'      <Rating name="{RATING_FROM}" toName="{RATING_IMAGE}" maxRating="{max_rating}" required="true" '
             f'size="large"/>']
    return "\n".join([
        "<View>",
        *_style(),
        *_prompt_block(key_help),
        '  <View className="qia-row">',
        *(_sources_column() if edit else []),
        *_image_column(RATING_IMAGE, "image", stars),
        "  </View>",
        "</View>",
    ])
