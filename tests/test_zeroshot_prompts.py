"""The exact lm-eval prompt strings of the first document of every task, read from the local data files.

Pinned literally, so a changed template, delimiter, strip or preprocessing step shows up here.
"""

from __future__ import annotations

import pytest

from lcc_jax.eval import ZEROSHOT_TASKS, load_docs

# task -> (context, shared by all choices, or one per choice; continuations; gold index)
PINNED: dict[str, tuple[str | tuple[str, ...], tuple[str, ...], int]] = {
    "boolq": (
        "Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be grown, collected, "
        "dried, fermented, distilled, and burned. All of these steps require resources and an infrastructure. The "
        "total amount of energy input into the process compared to the energy released by burning the resulting "
        "ethanol fuel is known as the energy balance (or ``energy returned on energy invested''). Figures compiled "
        "in a 2007 report by National Geographic Magazine point to modest results for corn ethanol produced in the "
        "US: one unit of fossil-fuel energy is required to create 1.3 energy units from the resulting ethanol. The "
        "energy balance for sugarcane ethanol produced in Brazil is more favorable, with one unit of fossil-fuel "
        "energy required to create 8 from the ethanol. Energy balance estimates are not easily produced, thus "
        "numerous such reports have been generated that are contradictory. For instance, a separate survey reports "
        "that production of ethanol from sugarcane, which requires a tropical climate to grow productively, returns "
        "from 8 to 9 units of energy for each unit expended, as compared to corn, which only returns about 1.34 "
        "units of fuel energy for each unit of energy expended. A 2006 University of California Berkeley study, "
        "after analyzing six separate studies, concluded that producing ethanol from corn uses much less petroleum "
        "than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:",
        (" no", " yes"),
        0,
    ),
    "rte": (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
        "Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:",
        (" True", " False"),
        1,  # label 1 = not entailment
    ),
    "hellaswag": (
        "Roof shingle removal: A man is sitting on a roof. He",  # ctx_b "he" capitalised
        (
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof.",
        ),
        3,  # label "3"
    ),
    "winogrande": (
        (
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ),
        (" always got the easier cases.", " always got the easier cases."),
        1,  # answer "2"
    ),
    "arc_easy": (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        (
            " Sunlight is the source of energy for nearly all ecosystems.",
            " Most ecosystems are found on land instead of in water.",
            " Carbon dioxide is more available than other gases.",
            " The producers in all ecosystems are plants.",
        ),
        0,
    ),
    "arc_challenge": (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:",
        (
            " Planetary density will decrease.",
            " Planetary years will become longer.",
            " Planetary days will become shorter.",
            " Planetary gravity will become stronger.",
        ),
        2,
    ),
    "openbookqa": (
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After "
        "looking over their budget and expenses, they decide the best way to save money is to",
        (" make more phone calls", " quit eating lunch out", " buy less with monopoly money", " have lunch with friends"),
        1,
    ),
    "piqa": (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        (
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will "
            "also need to supply it with a water bottle and a food dish.",
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
            "will also need to supply it with a water bottle and a food dish.",
        ),
        0,
    ),
}


def test_every_task_is_pinned():
    assert set(PINNED) == set(ZEROSHOT_TASKS)


@pytest.mark.parametrize("task", list(PINNED))
def test_first_document_prompts_are_lm_evals(task):
    context, continuations, gold = PINNED[task]
    (doc,) = load_docs(task, limit=1)
    contexts = (context,) * len(continuations) if isinstance(context, str) else context
    assert doc.contexts == contexts
    assert doc.continuations == continuations
    assert doc.gold == gold
    assert doc.requests == list(zip(contexts, continuations))


def test_record_fields_are_used_unstripped_as_lm_eval_does():
    doc = load_docs("piqa", limit=2)[1]  # sol1 ends in a space, sol2 holds a double space
    assert doc.contexts[0] == "Question: dresser\nAnswer:"
    assert doc.continuations == (" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin ")
    assert doc.choices == ("replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ")  # acc_norm lengths


def test_hellaswag_preprocessing_drops_titles_brackets_and_double_spaces():
    from lcc_jax.eval.tasks import hellaswag_preprocess

    assert hellaswag_preprocess(" Ways to cook [title] Heat the pan. [step] Add  oil. ") == (
        "Ways to cook. Heat the pan. Add oil."
    )
