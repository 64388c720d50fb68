"""Radiology reports for the demo studies: the planted findings in varied wording, with negations.

A report's findings section names every finding of its study (location and size where the study
has them), denies a random subset of the absent ones ("No midline shift."), says so when the study
is normal, and adds a few unrelated normal statements. Most reports end, as clinical reports do,
with an impression: the positive findings again in a few words each ("Impression: acute left MCA
infarct. Midline shift."), or that the study is normal. Spelling varies as it does between
radiologists (haemorrhage / hemorrhage, oedema / edema).
"""
from __future__ import annotations

import numpy as np

from .synth import StudySpec

POSITIVE = {
    "mass": [
        "There is a {size} mm mass in the {side} {region} with surrounding vasogenic {oedema}.",
        "A heterogeneous space-occupying lesion is seen in the {side} {region}, with perilesional {oedema}.",
        "{Side} {region} intra-axial mass measuring {size} mm, surrounded by {oedema}.",
        "Large {side} {region} tumour with extensive surrounding {oedema}.",
        "An infiltrating mass lesion of the {side} {region} with marked {oedema}.",
    ],
    "haemorrhage": [
        "Acute intraparenchymal {haemorrhage} in the {side} {region}.",
        "There is a {size} mm {haematoma} in the {side} {region}.",
        "{Side} {region} {haemorrhage} with a thin rim of {oedema}.",
        "Blood products are seen in the {side} {region}, in keeping with an intracerebral bleed.",
        "Intracerebral {haemorrhage} centred on the {side} {region}.",
    ],
    "infarct": [
        "Acute infarct in the {side} {region} territory with restricted diffusion.",
        "Restricted diffusion in the {side} {region} territory, consistent with acute {ischaemic} stroke.",
        "There is an acute {side} {region} territory infarction.",
        "Large area of diffusion restriction in the {side} hemisphere in keeping with an acute infarct.",
        "Acute {ischaemic} stroke involving the {side} {region} territory.",
    ],
    "atrophy": [
        "Generalised cerebral atrophy with ex vacuo dilatation of the ventricles.",
        "Prominent sulci and enlarged ventricles in keeping with global volume loss.",
        "Moderate to severe brain atrophy.",
        "There is diffuse cerebral volume loss with widened sulci.",
        "The ventricles and sulci are enlarged, consistent with cerebral atrophy.",
    ],
    "midline_shift": [
        "There is {shift} mm of midline shift to the {direction}.",
        "Midline structures are displaced {shift} mm to the {direction}.",
        "{Direction}ward shift of the midline structures by {shift} mm.",
        "The septum pellucidum is shifted to the {direction}.",
        "Midline shift of {shift} mm towards the {direction}.",
    ],
}

NEGATIVE = {
    "mass": ["No mass lesion.", "No intracranial mass or space-occupying lesion.", "There is no tumour.",
             "No focal mass is identified."],
    "haemorrhage": ["No intracranial {haemorrhage}.", "No evidence of {haemorrhage}.", "There is no intracranial bleeding.",
                    "No blood products are seen."],
    "infarct": ["No acute infarct.", "No restricted diffusion to suggest acute {ischaemia}.",
                "There is no evidence of acute stroke.", "No territorial infarction."],
    "atrophy": ["Ventricles and sulci are normal in size for age.", "No significant cerebral atrophy.",
                "Brain volume is preserved.", "No volume loss."],
    "midline_shift": ["No midline shift.", "Midline structures are central.", "There is no shift of the midline.",
                      "The septum pellucidum is midline."],
}

# the impression: each positive finding in a few words
IMPRESSION = {
    "mass": ["{side} {region} mass", "intra-axial mass lesion", "{side} {region} tumour with {oedema}", "space-occupying lesion"],
    "haemorrhage": ["intracerebral {haemorrhage}", "acute {side} {region} {haematoma}", "intraparenchymal bleed",
                    "acute {haemorrhage}"],
    "infarct": ["acute {side} {region} infarct", "acute {ischaemic} stroke", "acute infarct", "territorial infarction"],
    "atrophy": ["cerebral atrophy", "generalised volume loss", "brain atrophy", "atrophy"],
    "midline_shift": ["midline shift", "midline shift to the {direction}", "shift of the midline structures",
                      "mass effect with midline shift"],
}
IMPRESSION_NORMAL = ["Impression: normal study.", "Impression: no acute intracranial abnormality.", "Impression: unremarkable."]

NORMAL = ["No acute intracranial abnormality.", "Normal MRI of the brain.", "The brain parenchyma is normal.",
          "Unremarkable brain MRI."]
FILLER = ["The orbits and paranasal sinuses are unremarkable.", "The major intracranial flow voids are preserved.",
          "The cerebellum and brainstem are normal.", "No extra-axial collection.", "The craniocervical junction is normal.",
          "The pituitary gland is normal in size."]
SPELLINGS = {"oedema": ["oedema", "edema"], "haemorrhage": ["haemorrhage", "hemorrhage"],
             "haematoma": ["haematoma", "hematoma"], "ischaemic": ["ischaemic", "ischemic"], "ischaemia": ["ischaemia", "ischemia"]}


def _fill(template: str, rng: np.random.Generator, **facts) -> str:
    words = {k: str(rng.choice(v)) for k, v in SPELLINGS.items()}
    words.update(facts)
    words.update({k.capitalize(): str(v).capitalize() for k, v in words.items()})
    text = template.format(**words)
    return text[0].upper() + text[1:]


ARTERIES = {"middle cerebral artery": "MCA", "posterior cerebral artery": "PCA", "anterior cerebral artery": "ACA"}


def write_report(spec: StudySpec, rng: np.random.Generator, negation_rate: float = 0.6, impression_rate: float = 0.75) -> str:
    """The report of a study: one sentence per finding present, negations, normal statements, and
    (in ``impression_rate`` of the reports) an impression with the positive findings in a few words."""
    sentences, phrases = [], []
    for lesion in spec.lesions:
        facts = dict(side=lesion.side, region=lesion.region, size=int(round(2 * lesion.radius)))
        sentences.append(_fill(str(rng.choice(POSITIVE[lesion.kind])), rng, **facts))
        phrases.append(_fill(str(rng.choice(IMPRESSION[lesion.kind])), rng, **{**facts, "region": ARTERIES.get(lesion.region, lesion.region)}))
    if spec.labels.get("atrophy"):
        sentences.append(_fill(str(rng.choice(POSITIVE["atrophy"])), rng))
        phrases.append(_fill(str(rng.choice(IMPRESSION["atrophy"])), rng))
    if spec.labels.get("midline_shift"):
        direction = "right" if spec.shift_mm > 0 else "left"
        sentences.append(_fill(str(rng.choice(POSITIVE["midline_shift"])), rng, shift=int(round(abs(spec.shift_mm))), direction=direction))
        phrases.append(_fill(str(rng.choice(IMPRESSION["midline_shift"])), rng, direction=direction))
    for finding, present in spec.labels.items():
        if not present and rng.random() < negation_rate:
            sentences.append(_fill(str(rng.choice(NEGATIVE[finding])), rng))
    if not any(spec.labels.values()):
        sentences.append(str(rng.choice(NORMAL)))
    for i in rng.permutation(len(FILLER))[: int(rng.integers(0, 3))]:
        sentences.append(FILLER[i])
    report = [sentences[i] for i in rng.permutation(len(sentences))]
    if rng.random() < impression_rate:
        if phrases:
            ordered = [phrases[i] for i in rng.permutation(len(phrases))]
            report.append(f"Impression: {ordered[0][0].lower()}{ordered[0][1:]}.")
            report += [f"{p}." for p in ordered[1:]]
        else:
            report.append(str(rng.choice(IMPRESSION_NORMAL)))
    return " ".join(report)
