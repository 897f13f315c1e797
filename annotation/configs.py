"""Label Studio labeling configs (XML) and the names the pull step reads back."""
from __future__ import annotations

from xml.sax.saxutils import quoteattr

PAIRWISE_FROM = "pref"          # <Pairwise name=...>: result value {"selected": "left"|"right"}
IMAGE_A, IMAGE_B = "img_a", "img_b"
RATING_A, RATING_B = "rating_a", "rating_b"
BOTH_BAD = "both_bad"           # <Choices name=...>: a checked box means "neither image is acceptable"
RATING_FROM = "quality"         # rating project: <Rating name=...> value {"rating": 1..5}
RATING_IMAGE = "image"


def pairwise_config(per_image_rating: bool = False, both_bad: bool = True, max_rating: int = 5,
                    instructions: str = "Which image matches the prompt better? Click it.") -> str:
    """Two images side by side, a left/right choice, optional 1-5 rating per image, optional "both bad" flag.

    Task data keys: ``prompt``, ``image_a`` (left), ``image_b`` (right).
    """
    def column(img: str, key: str, rating: str) -> str:
        parts = [f'      <Image name="{img}" value="${key}" maxWidth="100%"/>']
        if per_image_rating:
            parts.append(f'      <Rating name="{rating}" toName="{img}" maxRating="{max_rating}"/>')
        return '    <View style="flex: 1; padding: 4px">\n' + "\n".join(parts) + "\n    </View>"

    lines = [
        "<View>",
        '  <Header value="$prompt"/>',
        f"  <Text name=\"instructions\" value={quoteattr(instructions)}/>",
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


def rating_config(max_rating: int = 5) -> str:
    """One image, its prompt, a required 1-5 star rating. Task data keys: ``prompt``, ``image``."""
    return "\n".join([
        "<View>",
        '  <Header value="$prompt"/>',
        f'  <Image name="{RATING_IMAGE}" value="$image" maxWidth="100%"/>',
        f'  <Rating name="{RATING_FROM}" toName="{RATING_IMAGE}" maxRating="{max_rating}" required="true"/>',
        "</View>",
    ])
