import pytest

from siad.errors import ConfigError
from siad.prompts import domain_template, domain_templates
from siad.prompts.templates import ANOVL_BASE_TEMPLATES, WINCLIP_TEMPLATES


def test_winclip_has_22_distinct_templates_and_anovl_drops_the_period():
    assert len(WINCLIP_TEMPLATES) == len(set(WINCLIP_TEMPLATES)) == 22
    assert all(t.endswith(".") for t in WINCLIP_TEMPLATES)
    assert ANOVL_BASE_TEMPLATES[0] == "a cropped photo of the {}"
    assert ANOVL_BASE_TEMPLATES[-1] == "a photo of a {} for anomaly detection"


@pytest.mark.parametrize(
    ("template", "domain", "expected"),
    [
        ("a cropped photo of the {}", "industrial photo", "a cropped industrial photo of the {}"),
        ("a photo of a {}", "industrial photo", "an industrial photo of a {}"),
        ("a photo of the large {}", "industrial image", "an industrial image of the large {}"),
        ("a jpeg corrupted photo of a {}", "manufacturing image", "a jpeg corrupted manufacturing image of a {}"),
        ("a photo of a small {}", "textural photo", "a textural photo of a small {}"),
        ("a photo of the {} for inspection", "surface picture", "a surface picture of the {} for inspection"),
    ],
)
def test_domain_template_replaces_photo_and_fixes_the_article(template, domain, expected):
    assert domain_template(template, domain) == expected


def test_domain_template_needs_the_word_photo():
    with pytest.raises(ConfigError, match="no word 'photo'"):
        domain_template("there is a {} in the scene", "industrial photo")
    with pytest.raises(ConfigError):
        domain_template("a photograph of a {}", "industrial photo")  # "photo" must be a whole word


def test_domain_templates_are_domain_major():
    out = domain_templates(["a photo of a {}", "a dark photo of the {}"], ["industrial photo", "surface picture"])
    assert out == (
        "an industrial photo of a {}",
        "a dark industrial photo of the {}",
        "a surface picture of a {}",
        "a dark surface picture of the {}",
    )
