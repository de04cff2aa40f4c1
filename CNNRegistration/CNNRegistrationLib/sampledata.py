"""The bundled sample pair in Slicer's Sample Data module (one click to try the module).

The files are the repository's ``Resources/SampleData`` (MNI152 at 2 mm and the same template
through a known smooth warp, with grey/white matter labels; sources and licence in its README),
downloaded from the repository and checked against their SHA-256. No Qt.
"""

from __future__ import annotations

import logging
import os

#: where the files are published (the repository's main branch, as the extension's icon URL)
REPOSITORY_FILES = "https://raw.githubusercontent.com/SlicerCNNRegistration/SlicerCNNRegistration/main/"
FOLDER = "Resources/SampleData/"
#: (sample, file, node name, SHA-256, label map)
FILES = (
    ("CNNRegistration brain pair", "fixed.nii.gz", "CNNRegistration fixed",
     "40770c8e48a82271830f30fa3b61f5b84f83abbf2c5647e5cdc897f28ff18c5b", False),
    ("CNNRegistration brain pair", "moving.nii.gz", "CNNRegistration moving",
     "6299e2995a1f856006513cd0ef5400de6e08808297c9b659444289f7379fed2a", False),
    ("CNNRegistration brain labels", "fixed_labels.nii.gz", "CNNRegistration fixed labels",
     "1a9069bd64d77bb513f343fd18f1e2fe63055d595630009eef3648c00188a9f2", True),
    ("CNNRegistration brain labels", "moving_labels.nii.gz", "CNNRegistration moving labels",
     "3fc2e0c85d5a5e6f64f9366ade4f36ceee2df09a14d3703bdc454851a7cf4eea", True),
)  # fmt: skip


def sampleDataSources(thumbnail: str | None = None) -> list:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource``, one
    dict per sample (the pair, its labels)."""
    sources = {}
    for sample, name, node, sha256, labelmap in FILES:
        source = sources.setdefault(
            sample,
            {
                "category": "CNNRegistration",
                "sampleName": sample,
                "thumbnailFileName": thumbnail,
                "uris": [],
                "fileNames": [],
                "nodeNames": [],
                "checksums": [],
                "loadFileProperties": {"labelmap": True} if labelmap else {},
            },
        )
        source["uris"].append(REPOSITORY_FILES + FOLDER + name)
        source["fileNames"].append(name)
        source["nodeNames"].append(node)
        source["checksums"].append(f"SHA256:{sha256}")
    return list(sources.values())


def registerSampleData(iconPath: str | None = None) -> None:
    """Register the samples with the Sample Data module (in the application, at start-up)."""
    try:
        import SampleData
    except ImportError:  # a Slicer without the Sample Data module
        return
    thumbnail = iconPath if iconPath and os.path.isfile(iconPath) else None
    for source in sampleDataSources(thumbnail):
        try:
            SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
        except TypeError:  # an older Sample Data module without loadFileProperties
            source.pop("loadFileProperties")
            SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
        except Exception as error:  # noqa: BLE001 - sample data must never break the module's start-up
            logging.warning("CNNRegistration: sample data not registered: %s", error)
