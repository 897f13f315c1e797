"""Label Studio labeling configs (XML) and the names the pull step reads back.

Project kinds: ``pairs`` and ``ratings`` (text-to-image: prompt + images), ``edit-pairs`` and ``edit-ratings``
(an edit instruction + 1-3 source images + the edit(s)).
"""
from __future__ import annotations

from xml.sax.saxutils import quoteattr

from .errors import AnnotationError

KINDS = ("pairs", "ratings", "edit-pairs", "edit-ratings")

PAIRWISE_FROM = "pref"          # <Pairwise name=...>: result value {"selected": "left"|"right"}
IMAGE_A, IMAGE_B = "img_a", "img_b"
RATING_A, RATING_B = "rating_a", "rating_b"
BOTH_BAD = "both_bad"           # <Choices name=...>: a checked box means "neither image is acceptable"
RATING_FROM = "quality"         # rating project: <Rating name=...> value {"rating": 1..5}
RATING_IMAGE = "image"
# Edit projects: the source (control) images above the edit(s), one <Image valueList> for 1-3 of them. Its name
# is what marks a project as an edit project (pull.project_kind).
SOURCES = "sources"
SOURCES_KEY = "control_images"  # task data: list of source URLs (the column name align/data/edit.py reads)
PAIR_INSTRUCTIONS = "Which image matches the prompt better? Click it."
EDIT_PAIR_INSTRUCTIONS = ("Which edit follows the instruction better, keeping the rest of the source image(s)? "
                          "Click it.")


def _sources_block() -> list[str]:
    """The instruction is the task's ``prompt``; the sources are paged when there are several."""
    return ['  <Header value="Source image(s)" size="6"/>',
            f'  <Image name="{SOURCES}" valueList="${SOURCES_KEY}" maxWidth="100%"/>']


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
    """Two images side by side, a left/right choice, optional 1-5 rating per image, optional "both bad" flag.

    Task data keys: ``prompt``, ``image_a`` (left), ``image_b`` (right); ``edit``: also ``control_images`` (1-3
    source URLs, shown above the two edits) and ``prompt`` is the edit instruction.
    """
    if instructions is None:
        instructions = EDIT_PAIR_INSTRUCTIONS if edit else PAIR_INSTRUCTIONS

    def column(img: str, key: str, rating: str) -> str:
        parts = [f'      <Image name="{img}" value="${key}" maxWidth="100%"/>']
        if per_image_rating:
            parts.append(f'      <Rating name="{rating}" toName="{img}" maxRating="{max_rating}"/>')
        return '    <View style="flex: 1; padding: 4px">\n' + "\n".join(parts) + "\n    </View>"

    lines = [
        "<View>",
        '  <Header value="$prompt"/>',
        f"  <Text name=\"instructions\" value={quoteattr(instructions)}/>",
        *(_sources_block() if edit else []),
        *(['  <Header value="Edits" size="6"/>'] if edit else []),
        '  <View style="display: flex; gap: 8px">',
        column(IMAGE_A, "image_a", RATING_A),
        column(IMAGE_B, "image_b", RATING_B),
        "  </View>",
        f'  <Pairwise name="{PAIRWISE_FROM}" toName="{IMAGE_A},{IMAGE_B}"/>',
    ]
    if both_bad:
        lines += [
            f'  <Choices name="{BOTH_BAD}" toName="{IMAGE_A}" choice="multiple">',
            f'    <Choice value="Both images are bad" alias="{BOTH_BAD}"/>',
            "  </Choices>",
        ]
    lines.append("</View>")
    return "\n".join(lines)


def rating_config(max_rating: int = 5, edit: bool = False) -> str:
    """One image, its prompt, a required 1-5 star rating. Task data keys: ``prompt``, ``image``; ``edit``: also
    ``control_images`` (the 1-3 sources, shown above the edit) and ``prompt`` is the edit instruction."""
    return "\n".join([
        "<View>",
        '  <Header value="$prompt"/>',
        *(_sources_block() + ['  <Header value="Edit" size="6"/>'] if edit else []),
        f'  <Image name="{RATING_IMAGE}" value="$image" maxWidth="100%"/>',
        f'  <Rating name="{RATING_FROM}" toName="{RATING_IMAGE}" maxRating="{max_rating}" required="true"/>',
        "</View>",
    ])
