"""The nine datasets of the benchmark: where they come from, their classes, counts and converter.

Each :class:`DatasetSpec` joins the acquisition facts (sources, licence; spec table A) with the
content facts kept in its converter module (class list, published test counts; spec table B) and
the converter itself. Protocol variants are options: ``sdd_protocol`` (SDD), ``medical_protocol``
(BrainMRI, HeadCT, Br35H) and ``visa_split`` (VisA, only ``1cls``); the keys of
``expected_test_counts`` are the allowed values of that option, the first being the default.
Datasets without variants use the single protocol key ``"default"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siad.data.converters import br35h, brainmri, btad, dtd, headct, mpdd, mvtec, sdd, visa
from siad.data.records import Meta, count
from siad.data.sources import KaggleSource, ManualSource, Source, UrlSource
from siad.errors import ConfigError, DataError, UnknownNameError
from siad.registry import Registry

TOTAL = "__total__"  # key of a dataset-wide (normal, anomalous) count when per-class counts are unpublished
DEFAULT_PROTOCOL = "default"
Converter = Callable[[Path, Mapping[str, str]], Meta]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the suite knows about one dataset (see the module docstring)."""

    name: str
    display_name: str
    domain: str  # "industrial" | "medical"
    classes: tuple[str, ...]
    has_masks: bool
    sources: tuple[Source, ...]
    licence: str
    folder: str
    expected_test_counts: Mapping[str, Mapping[str, tuple[int, int]]] = field(hash=False)
    converter: Converter = field(hash=False, repr=False)
    protocol_option: str | None = None
    notes: str = ""
    download_protocols: tuple[str, ...] | None = None  # protocols the sources can provide (None: all)
    listing: str = ""  # file listing the images (a removed image needs its row removed); {option} placeholders

    @property
    def protocols(self) -> tuple[str, ...]:
        """Allowed values of ``protocol_option`` (first = default)."""
        return tuple(self.expected_test_counts)

    def options_with_defaults(self, options: Mapping[str, Any] | None = None) -> dict[str, str]:
        """This dataset's options, defaults filled in.

        Options of other datasets are accepted and dropped (one config block may serve all datasets);
        a key no dataset knows, or a value this dataset does not allow, raises ConfigError.
        """
        options = dict(options or {})
        known = known_option_keys()
        for key in options:
            if key not in known:
                raise ConfigError(f"dataset option {key!r} unknown; known options: {', '.join(sorted(known))}")
        if self.protocol_option is None:
            return {}
        value = str(options.get(self.protocol_option, self.protocols[0]))
        if value not in self.protocols:
            raise ConfigError(f"{self.name}: {self.protocol_option}={value!r} is not one of {self.protocols}")
        return {self.protocol_option: value}

    def protocol(self, options: Mapping[str, Any] | None = None) -> str:
        """The protocol key of ``expected_test_counts`` selected by ``options``."""
        if self.protocol_option is None:
            return DEFAULT_PROTOCOL
        return self.options_with_defaults(options)[self.protocol_option]

    def downloadable(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether the sources can provide the data of the protocol ``options`` select."""
        return self.download_protocols is None or self.protocol(options) in self.download_protocols

    def check_classes(self, classes: Iterable[str] | None) -> tuple[str, ...]:
        """``classes`` in canonical order (None: every class); an unknown name raises UnknownNameError."""
        if classes is None:
            return self.classes
        chosen = set(classes)
        unknown = sorted(chosen - set(self.classes))
        if unknown:
            raise UnknownNameError(f"{self.name}: unknown class(es) {unknown}; known: {', '.join(self.classes)}")
        return tuple(c for c in self.classes if c in chosen)

    def convert(self, root: Path, options: Mapping[str, Any] | None = None) -> Meta:
        """Index the native layout under ``root`` (paths in the result are relative to ``root``)."""
        return self.converter(Path(root), self.options_with_defaults(options))

    def check_counts(self, meta: Meta, options: Mapping[str, Any] | None = None,
                     classes: Iterable[str] | None = None) -> None:
        """Compare the test split of ``classes`` (None: all) with the published counts.

        Raises:
            DataError: listing every mismatch and naming the config key that disables the check.
        """
        protocol = self.protocol(options)
        chosen = self.check_classes(classes)
        actual = {c: n for c, n in count(meta, "test").items() if c in chosen or c not in self.classes}
        problems = count_mismatches(chosen, self.expected_test_counts[protocol], actual,
                                    whole=chosen == self.classes)
        if problems:
            raise DataError(
                f"{self.display_name} ({self.name}, protocol {protocol}): test split differs from the published "
                f"counts (normal, anomalous): {'; '.join(problems)}. The copy is incomplete or modified: "
                "re-download / re-extract it; for a deliberate subset or a synthetic stand-in disable the check "
                "with `data.verify_counts: false` in the config (or restrict `datasets."
                f"{self.name}.classes` to the classes you have).")


def count_mismatches(classes: tuple[str, ...], expected: Mapping[str, tuple[int, int]],
                     actual: Mapping[str, tuple[int, int]], whole: bool = True) -> list[str]:
    """Human-readable differences between expected and actual per-class test counts of ``classes``.

    ``whole`` says ``classes`` are all the dataset's classes; otherwise a dataset-wide total
    (:data:`TOTAL`) cannot be compared and is skipped.
    """
    problems = [f"class {c} missing" for c in classes if c not in actual]
    problems += [f"class {c} unexpected" for c in actual if c not in classes]
    for cls, want in expected.items():
        if cls == TOTAL:
            if not whole:
                continue
            got = tuple(sum(v[i] for v in actual.values()) for i in (0, 1))
        elif cls in classes and cls in actual:
            got = actual[cls]
        else:
            continue
        if tuple(got) != tuple(want):
            problems.append(f"{'total' if cls == TOTAL else cls}: expected {tuple(want)}, found {tuple(got)}")
    return problems


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def known_option_keys() -> set[str]:
    """Option keys understood by at least one registered dataset."""
    specs = (DATASETS.get(name) for name in DATASETS)
    return {spec.protocol_option for spec in specs if spec.protocol_option is not None}


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered as ``name`` (UnknownNameError listing the known names otherwise)."""
    return DATASETS.get(name)


def _kaggle(slug: str) -> KaggleSource:
    return KaggleSource(slug=slug, filename=f"{slug.split('/')[1]}.zip")


_NC_SA = "CC BY-NC-SA 4.0"
_KAGGLE_LICENCE = "see the Kaggle page (not verified)"
_MEDICAL = {"domain": "medical", "has_masks": False, "licence": _KAGGLE_LICENCE, "protocol_option": "medical_protocol"}

_SPECS = (
    DatasetSpec(
        name="mvtec", display_name="MVTecAD", domain="industrial", classes=mvtec.CLASSES, has_masks=True,
        sources=(UrlSource(
            urls=("https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
                  "420938113-1629960298/mvtec_anomaly_detection.tar.xz",),
            filename="mvtec_anomaly_detection.tar.xz",
            sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"),),
        licence=_NC_SA, folder="mvtec", expected_test_counts=mvtec.EXPECTED_TEST_COUNTS, converter=mvtec.convert,
        notes="The mydrive URL has rotated several times; the sha256 has not."),
    DatasetSpec(
        name="visa", display_name="VisA", domain="industrial", classes=visa.CLASSES, has_masks=True,
        sources=(UrlSource(urls=("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",),
                           filename="VisA_20220922.tar",
                           sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"),),
        licence="CC BY 4.0", folder="visa", expected_test_counts=visa.EXPECTED_TEST_COUNTS, converter=visa.convert,
        protocol_option="visa_split", listing="split_csv/{visa_split}.csv"),
    DatasetSpec(
        name="mpdd", display_name="MPDD", domain="industrial", classes=mpdd.CLASSES, has_masks=True,
        sources=(ManualSource(
            page="https://vutbr-my.sharepoint.com/:f:/g/personal/xjezek16_vutbr_cz/"
                 "EhHS_ufVigxDo3MC6Lweau0BVMuoCmhMZj6ddamiQ7-FnA?e=oHKCxI",
            filename="MPDD.zip",
            instructions="open the SharePoint folder in a browser, download it as a zip (all six classes: "
                         "bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes) and save "
                         "it under this name; an unverified Kaggle mirror is "
                         "lephonghao/metal-parts-defect-detection-dataset-mpdd"),),
        licence=_NC_SA, folder="mpdd", expected_test_counts=mpdd.EXPECTED_TEST_COUNTS, converter=mpdd.convert),
    DatasetSpec(
        name="dtd", display_name="DTD", domain="industrial", classes=dtd.CLASSES, has_masks=True,
        sources=(ManualSource(
            page="https://drive.google.com/drive/folders/10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1",
            filename="DTD-Synthetic.zip",
            instructions="download the DTD-Synthetic zip from the Google Drive folder of the WACV'23 paper "
                         "(lab page https://vision.is.tohoku.ac.jp/?lang=en&p=383) and save it under this name"),),
        licence="not stated (DTD itself: research use only)", folder="dtd",
        expected_test_counts=dtd.EXPECTED_TEST_COUNTS, converter=dtd.convert),
    DatasetSpec(
        name="sdd", display_name="SDD", domain="industrial", classes=sdd.CLASSES, has_masks=True,
        sources=(UrlSource(urls=("https://data.vicos.si/datasets/KSDD/KolektorSDD.zip",
                                 "https://go.vicos.si/kolektorsdd"),
                           filename="KolektorSDD.zip",
                           sha256="65dc621693418585de9c4467d1340ea7958a6181816f0dc2883a1e8b61f9d4dc"),),
        licence=_NC_SA, folder="sdd", expected_test_counts=sdd.EXPECTED_TEST_COUNTS, converter=sdd.convert,
        protocol_option="sdd_protocol", download_protocols=("adaclip_thirds",),
        notes=f"sdd_protocol=anomalyclip_drive needs AnomalyCLIP's prepared folder ({sdd.DRIVE_URL}), "
              "a manual download extracted into the dataset folder."),
    DatasetSpec(
        name="btad", display_name="BTAD", domain="industrial", classes=btad.CLASSES, has_masks=True,
        sources=(UrlSource(urls=("https://avires.dimi.uniud.it/papers/btad/btad.zip",), filename="btad.zip",
                           sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a"),),
        licence="CC BY-SA 4.0", folder="btad", expected_test_counts=btad.EXPECTED_TEST_COUNTS, converter=btad.convert),
    DatasetSpec(
        name="brainmri", display_name="BrainMRI", classes=brainmri.CLASSES,
        sources=(_kaggle("navoneel/brain-mri-images-for-brain-tumor-detection"),), folder="brainmri",
        expected_test_counts=brainmri.EXPECTED_TEST_COUNTS, converter=brainmri.convert, **_MEDICAL),
    DatasetSpec(
        name="headct", display_name="HeadCT", classes=headct.CLASSES,
        sources=(_kaggle("felipekitamura/head-ct-hemorrhage"),), folder="headct",
        expected_test_counts=headct.EXPECTED_TEST_COUNTS, converter=headct.convert, listing="labels.csv", **_MEDICAL),
    DatasetSpec(
        name="br35h", display_name="Br35H", classes=br35h.CLASSES,
        sources=(_kaggle("ahmedhamada0/brain-tumor-detection"),), folder="br35h",
        expected_test_counts=br35h.EXPECTED_TEST_COUNTS, converter=br35h.convert, **_MEDICAL),
)

for _spec in _SPECS:
    DATASETS.add(_spec.name, _spec)
