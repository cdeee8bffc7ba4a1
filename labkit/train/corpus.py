"""Seeded generator of the skincare Q&A corpus the embedded model is trained on.

Answers are composed, not looked up: a small knowledge base (skin types, concerns, ingredients,
routine steps) is rendered through many phrasings, orderings and layouts (prose with
transitions, numbered lists, labelled steps, morning/evening sections), so a small model learns
to write on-topic sentences rather than recite a handful of fixed answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_ANSWER_WORDS = 100  # ~40-150 tokens with the corpus's own BPE


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


# --------------------------------------------------------------------------- knowledge base

SKIN_TYPES: dict[str, dict[str, list[str]]] = {
    "dry": {
        "names": ["dry skin", "dry, flaky skin", "skin that feels tight and dry"],
        "goal": ["keep moisture in and protect the skin barrier", "add hydration and seal it in",
                 "comfort tight skin and rebuild the barrier", "replace lost oils and water"],
        "cleanser": ["a creamy, non-foaming cleanser", "a gentle cream cleanser",
                     "a hydrating milk cleanser", "a soft cleansing balm",
                     "a low-foam gel with glycerin"],
        "toner": ["an alcohol-free hydrating toner", "a milky essence",
                  "a soothing toner with glycerin"],
        "serum": ["a hyaluronic acid serum", "a serum with glycerin and panthenol",
                  "a hydrating serum with hyaluronic acid", "a few drops of a squalane serum"],
        "moisturizer": ["a rich cream with ceramides", "a thick moisturizer with shea butter",
                        "a nourishing cream with ceramides and fatty acids",
                        "a barrier cream with cholesterol and ceramides"],
        "night": ["a thin layer of facial oil over your cream", "an overnight sleeping mask",
                  "a richer night cream", "a drop of squalane pressed over your moisturizer"],
        "sunscreen": ["a moisturizing sunscreen with SPF 30 or higher",
                      "a cream sunscreen with broad-spectrum SPF 30", "a hydrating SPF 50"],
        "exfoliant": ["a mild lactic acid lotion once a week", "a gentle enzyme mask once a week"],
        "avoid": ["harsh foaming cleansers", "toners that contain a lot of alcohol",
                  "very hot showers", "scrubs with rough particles"],
    },
    "oily": {
        "names": ["oily skin", "shiny, oily skin", "skin that gets greasy by midday"],
        "goal": ["control shine without stripping the skin", "keep pores clear and balance oil",
                 "remove excess oil while keeping the skin hydrated"],
        "cleanser": ["a foaming gel cleanser", "a gentle gel cleanser",
                     "a cleanser with salicylic acid", "a light foaming wash"],
        "toner": ["a balancing toner with niacinamide", "an alcohol-free toner",
                  "a toner with a little salicylic acid"],
        "serum": ["a niacinamide serum", "a lightweight hyaluronic acid serum",
                  "a serum with niacinamide and zinc"],
        "moisturizer": ["a lightweight gel moisturizer", "an oil-free gel cream",
                        "a light, non-comedogenic lotion", "a water-based moisturizer"],
        "night": ["a BHA exfoliant two or three nights a week",
                  "a light retinoid a few nights a week",
                  "a clay mask once a week"],
        "sunscreen": ["a matte, oil-free sunscreen with SPF 30", "a light gel sunscreen",
                      "a fluid sunscreen with broad-spectrum SPF 50"],
        "exfoliant": ["a salicylic acid exfoliant two or three times a week",
                      "a clay mask once a week"],
        "avoid": ["heavy creams and oils that clog pores", "scrubbing too hard",
                  "going without moisturizer", "washing your face too often"],
    },
    "combination": {
        "names": ["combination skin", "skin that is oily in the T-zone and dry on the cheeks",
                  "combination skin with an oily T-zone"],
        "goal": ["balance an oily T-zone and drier cheeks", "hydrate without adding shine",
                 "treat each area of the face according to its needs"],
        "cleanser": ["a gentle gel cleanser", "a mild, low-foam cleanser", "a balancing gel wash"],
        "toner": ["a hydrating, alcohol-free toner", "a toner with niacinamide"],
        "serum": ["a niacinamide serum", "a hyaluronic acid serum", "a light hydrating serum"],
        "moisturizer": ["a light lotion all over and a richer cream on dry patches",
                        "a gel cream", "a lightweight moisturizer"],
        "night": ["a BHA on the T-zone a few nights a week",
                  "an extra layer of cream on the cheeks",
                  "a gentle retinoid twice a week"],
        "sunscreen": ["a lightweight sunscreen with SPF 30", "a fluid broad-spectrum SPF 50"],
        "exfoliant": ["a mild acid exfoliant once or twice a week",
                      "a clay mask on the T-zone only"],
        "avoid": ["heavy products on the T-zone", "harsh cleansers that dry the cheeks"],
    },
    "sensitive": {
        "names": ["sensitive skin", "sensitive, easily irritated skin", "reactive skin"],
        "goal": ["calm the skin and avoid irritation", "soothe the skin and keep it comfortable",
                 "support the barrier with as few products as possible"],
        "cleanser": ["a fragrance-free cream cleanser", "a mild, soap-free cleanser",
                     "a gentle micellar water", "a fragrance-free gel cleanser"],
        "toner": ["a soothing toner with centella", "a fragrance-free hydrating mist"],
        "serum": ["a calming serum with centella", "a panthenol serum",
                  "a fragrance-free hyaluronic acid serum"],
        "moisturizer": ["a fragrance-free moisturizer with ceramides", "a simple barrier cream",
                        "a calming cream with oat extract"],
        "night": ["a soothing balm on any dry or red areas", "a thicker layer of barrier cream"],
        "sunscreen": ["a mineral sunscreen with zinc oxide", "a fragrance-free mineral SPF 30",
                      "a sunscreen made for sensitive skin"],
        "exfoliant": ["a very gentle enzyme mask at most once a week"],
        "avoid": ["fragrance and essential oils", "strong acids and scrubs",
                  "trying many new products at once", "hot water"],
    },
    "normal": {
        "names": ["normal skin", "balanced skin", "skin that is neither oily nor dry"],
        "goal": ["keep the skin healthy and protected", "maintain balance and prevent damage",
                 "protect the skin with a few well-chosen products"],
        "cleanser": ["a gentle cleanser", "a mild gel cleanser", "a light cream cleanser"],
        "toner": ["a hydrating toner", "an alcohol-free toner"],
        "serum": ["a vitamin C serum", "a hyaluronic acid serum", "an antioxidant serum"],
        "moisturizer": ["a light moisturizer", "a lotion with ceramides", "a simple daily cream"],
        "night": ["a retinol serum a few nights a week", "a slightly richer night cream"],
        "sunscreen": ["a broad-spectrum sunscreen with SPF 30",
                      "a daily sunscreen with SPF 30 or higher"],
        "exfoliant": ["a gentle AHA exfoliant once or twice a week"],
        "avoid": ["overloading the routine with too many actives", "going without sunscreen"],
    },
    "acne-prone": {
        "names": ["acne-prone skin", "skin that breaks out easily", "blemish-prone skin"],
        "goal": ["keep pores clear without irritating the skin",
                 "reduce breakouts and calm redness",
                 "treat blemishes while protecting the barrier"],
        "cleanser": ["a gentle salicylic acid cleanser", "a mild gel cleanser",
                     "a cleanser with benzoyl peroxide", "a non-comedogenic foaming cleanser"],
        "toner": ["a toner with niacinamide", "an alcohol-free toner with a little BHA"],
        "serum": ["a niacinamide serum", "an azelaic acid serum", "a light hydrating serum"],
        "moisturizer": ["an oil-free, non-comedogenic moisturizer", "a light gel moisturizer",
                        "a simple non-comedogenic lotion"],
        "night": ["a thin layer of adapalene gel", "a salicylic acid treatment",
                  "a benzoyl peroxide spot treatment on active pimples", "an azelaic acid cream"],
        "sunscreen": ["an oil-free sunscreen with SPF 30", "a non-comedogenic SPF 50",
                      "a light gel sunscreen"],
        "exfoliant": ["a BHA exfoliant two or three times a week"],
        "avoid": ["picking or squeezing pimples", "heavy oils",
                  "using several strong acids together",
                  "scrubbing active breakouts"],
    },
    "mature": {
        "names": ["mature skin", "aging skin", "skin with fine lines and less firmness"],
        "goal": ["support firmness and keep the skin hydrated",
                 "soften fine lines and protect the skin",
                 "boost hydration and encourage cell renewal"],
        "cleanser": ["a creamy cleanser", "a gentle cleansing balm", "a hydrating cleanser"],
        "toner": ["a hydrating essence", "a toner with peptides"],
        "serum": ["a vitamin C serum", "a peptide serum", "a hyaluronic acid serum"],
        "moisturizer": ["a rich cream with peptides", "a moisturizer with ceramides",
                        "a nourishing cream"],
        "night": ["a retinol serum", "a retinoid cream a few nights a week",
                  "a peptide night cream"],
        "sunscreen": ["a hydrating sunscreen with SPF 30 or higher", "a broad-spectrum SPF 50"],
        "exfoliant": ["a gentle lactic acid exfoliant once a week"],
        "avoid": ["harsh scrubs", "going without sunscreen", "starting retinol at full strength"],
    },
    "dehydrated": {
        "names": ["dehydrated skin", "skin that feels tight but still gets oily",
                  "dull, dehydrated skin"],
        "goal": ["add water back to the skin and keep it there", "hydrate in light layers",
                 "restore comfort and a healthy glow"],
        "cleanser": ["a gentle, low-foam cleanser", "a hydrating gel cleanser"],
        "toner": ["a hydrating toner", "a watery essence", "a mist with glycerin"],
        "serum": ["a hyaluronic acid serum", "a serum with glycerin and panthenol"],
        "moisturizer": ["a gel cream with ceramides", "a light moisturizer with glycerin"],
        "night": ["a hydrating sleeping mask", "an extra layer of moisturizer"],
        "sunscreen": ["a hydrating sunscreen with SPF 30", "a light SPF 50 lotion"],
        "exfoliant": ["a mild PHA exfoliant once a week"],
        "avoid": ["long hot showers", "alcohol-based toners", "over-exfoliating"],
    },
}

CONCERNS: dict[str, dict[str, list]] = {
    "acne": {
        "skins": ["acne-prone", "acne-prone", "oily"],
        "names": ["acne", "breakouts", "pimples", "blemishes"],
        "actives": ["salicylic acid", "benzoyl peroxide", "adapalene", "niacinamide",
                    "azelaic acid"],
        "treatment": ["a salicylic acid treatment", "a thin layer of adapalene gel",
                      "a benzoyl peroxide spot treatment", "an azelaic acid cream"],
        "tips": ["Change your pillowcase often and keep your hands off your face.",
                 "Give a new acne treatment six to eight weeks before you judge it.",
                 "Use one strong active at a time so your skin does not get irritated.",
                 "Choose products labelled non-comedogenic."],
        "caution": ["If breakouts are painful, deep or leave scars, see a dermatologist.",
                    "Benzoyl peroxide can bleach towels and pillowcases."],
    },
    "dark spots": {
        "skins": [None, None, "normal", "combination", "oily", "mature"],
        "names": ["dark spots", "hyperpigmentation", "marks left by old pimples",
                  "uneven skin tone"],
        "actives": ["vitamin C", "niacinamide", "azelaic acid", "retinol", "alpha arbutin"],
        "treatment": ["a vitamin C serum in the morning", "a niacinamide serum",
                      "an azelaic acid cream", "a retinol serum at night"],
        "tips": ["Sunscreen matters most, because sunlight makes dark spots darker.",
                 "Fading spots takes patience: expect results after two to three months.",
                 "Reapply sunscreen every two hours when you are outside."],
        "caution": ["If a spot changes shape, size or color, have a doctor look at it.",
                    "Avoid harsh bleaching creams sold without a prescription."],
    },
    "fine lines": {
        "skins": [None, "mature", "mature", "normal", "dry"],
        "names": ["fine lines", "wrinkles", "signs of aging", "loss of firmness"],
        "actives": ["retinol", "peptides", "vitamin C", "hyaluronic acid"],
        "treatment": ["a retinol serum a few nights a week", "a peptide serum",
                      "a vitamin C serum in the morning", "a retinoid cream"],
        "tips": ["Daily sunscreen is the most effective anti-aging step.",
                 "Start retinol slowly, two or three nights a week, and build up.",
                 "Keep the skin well hydrated so lines look softer."],
        "caution": ["Retinoids are not recommended during pregnancy.",
                    "Retinol can cause dryness and peeling at first."],
    },
    "redness": {
        "skins": [None, "sensitive", "sensitive"],
        "names": ["redness", "flushing", "red, irritated skin"],
        "actives": ["azelaic acid", "niacinamide", "centella", "panthenol"],
        "treatment": ["a calming serum with centella", "an azelaic acid cream",
                      "a niacinamide serum at a low strength"],
        "tips": ["Keep the routine short and fragrance-free.",
                 "Use lukewarm water and pat the skin dry instead of rubbing.",
                 "Hot drinks, spicy food and heat can make flushing worse."],
        "caution": ["Persistent redness can be rosacea, which a dermatologist can treat.",
                    "Stop any product that stings or burns."],
    },
    "dullness": {
        "skins": [None, None, "normal", "dry", "dehydrated", "combination"],
        "names": ["dullness", "dull skin", "a tired-looking complexion", "lack of glow"],
        "actives": ["vitamin C", "lactic acid", "glycolic acid", "niacinamide"],
        "treatment": ["a vitamin C serum", "a gentle AHA exfoliant twice a week",
                      "a lactic acid serum at night"],
        "tips": ["Regular gentle exfoliation helps the skin reflect light.",
                 "Hydration makes the skin look fresher almost at once.",
                 "Sleep and water help more than any single product."],
        "caution": ["Do not exfoliate every day; twice a week is plenty for most people."],
    },
    "large pores": {
        "skins": [None, "oily", "combination"],
        "names": ["large pores", "visible pores", "enlarged pores"],
        "actives": ["salicylic acid", "niacinamide", "retinol", "clay"],
        "treatment": ["a BHA exfoliant", "a niacinamide serum", "a clay mask once a week"],
        "tips": ["Pores cannot be closed, but keeping them clear makes them look smaller.",
                 "A light, oil-free moisturizer keeps the skin balanced."],
        "caution": ["Avoid pore strips and squeezing, which can damage the skin."],
    },
    "blackheads": {
        "skins": [None, "oily", "combination", "acne-prone"],
        "names": ["blackheads", "clogged pores", "congested skin"],
        "actives": ["salicylic acid", "retinol", "clay", "niacinamide"],
        "treatment": ["a salicylic acid exfoliant", "a clay mask once a week", "a gentle retinoid"],
        "tips": ["Salicylic acid dissolves oil inside the pore, so it works well on blackheads.",
                 "Double cleanse at night if you wear sunscreen or makeup."],
        "caution": ["Do not squeeze blackheads; it can cause scars and infection."],
    },
    "dryness": {
        "skins": [None, "dry", "dry", "dehydrated", "sensitive"],
        "names": ["dryness", "flaky patches", "tight, dry skin"],
        "actives": ["ceramides", "hyaluronic acid", "glycerin", "squalane", "shea butter"],
        "treatment": ["a rich cream with ceramides", "a hyaluronic acid serum on damp skin",
                      "a squalane serum"],
        "tips": ["Apply moisturizer while your skin is still slightly damp.",
                 "A humidifier helps in dry or heated rooms.", "Use lukewarm water, not hot."],
        "caution": ["Cracked or very itchy skin may need a doctor's advice."],
    },
}

INGREDIENTS: dict[str, dict[str, list[str]]] = {
    "niacinamide": {
        "does": ["calms redness, helps control oil and strengthens the skin barrier",
                 "evens out skin tone and makes pores look smaller",
                 "supports the barrier and reduces shine"],
        "time": ["morning or evening"], "suits": ["oily", "acne-prone", "combination", "sensitive"],
        "how": ["Use a serum with two to five percent niacinamide after cleansing.",
                "Apply a few drops before your moisturizer, once or twice a day."],
        "caution": ["High strengths can cause tingling, so start with a lower one."],
    },
    "retinol": {
        "does": ["speeds up cell renewal, softens fine lines and helps keep pores clear",
                 "smooths texture and fades dark spots over time",
                 "encourages collagen and improves the look of wrinkles"],
        "time": ["evening"], "suits": ["mature", "normal", "oily"],
        "how": ["Start with a pea-sized amount two nights a week and slowly increase.",
                "Apply it at night on dry skin, then follow with moisturizer."],
        "caution": ["It can cause dryness and peeling at first.",
                    "Always wear sunscreen during the day when you use retinol.",
                    "Avoid it during pregnancy."],
    },
    "vitamin C": {
        "does": ["brightens the skin and protects it from free radicals",
                 "fades dark spots and gives a more even tone",
                 "boosts the protection of your sunscreen"],
        "time": ["morning"], "suits": ["normal", "mature", "dry", "combination"],
        "how": ["Apply a few drops after cleansing in the morning, then moisturizer and sunscreen.",
                "Keep the bottle closed and away from light so it lasts longer."],
        "caution": ["Strong forms can sting sensitive skin.",
                    "A serum that turns dark brown has oxidized."],
    },
    "hyaluronic acid": {
        "does": ["draws water into the skin and makes it look plump",
                 "hydrates without feeling heavy", "helps the skin hold on to moisture"],
        "time": ["morning or evening"],
        "suits": ["dry", "dehydrated", "oily", "normal", "sensitive", "combination"],
        "how": ["Apply it to damp skin and seal it in with moisturizer.",
                "Use a few drops after cleansing, morning and night."],
        "caution": ["In very dry air, always follow it with a moisturizer."],
    },
    "salicylic acid": {
        "does": ["exfoliates inside the pore and helps clear blackheads",
                 "dissolves excess oil and reduces breakouts", "keeps pores clear"],
        "time": ["evening"], "suits": ["oily", "acne-prone", "combination"],
        "how": ["Use a two percent leave-on exfoliant two or three times a week.",
                "A cleanser with salicylic acid is a gentle way to start."],
        "caution": ["It can dry the skin, so do not combine it with other strong acids at first."],
    },
    "glycolic acid": {
        "does": ["removes dead cells from the surface and brightens the skin",
                 "smooths rough texture"],
        "time": ["evening"], "suits": ["normal", "mature", "dry"],
        "how": ["Use it one to three evenings a week after cleansing."],
        "caution": ["It makes the skin more sensitive to the sun.",
                    "Skip it on nights when you use retinol."],
    },
    "ceramides": {
        "does": ["repair the skin barrier and keep moisture in",
                 "make dry skin feel comfortable again"],
        "time": ["morning or evening"], "suits": ["dry", "sensitive", "mature", "dehydrated"],
        "how": ["Look for them in your moisturizer and use it twice a day."],
        "caution": ["They are gentle and suit almost everyone."],
    },
    "benzoyl peroxide": {
        "does": ["kills the bacteria that cause acne", "calms inflamed pimples"],
        "time": ["evening"], "suits": ["acne-prone", "oily"],
        "how": ["Start with a low strength as a wash or a thin layer on breakouts."],
        "caution": ["It can dry the skin and bleach fabrics."],
    },
    "azelaic acid": {
        "does": ["calms redness, treats breakouts and fades marks",
                 "evens skin tone and soothes the skin"],
        "time": ["morning or evening"], "suits": ["sensitive", "acne-prone", "combination"],
        "how": ["Apply a thin layer once a day after cleansing, then moisturize."],
        "caution": ["It may tingle for the first few days."],
    },
    "sunscreen": {
        "does": ["protects the skin from UV damage, dark spots and early wrinkles",
                 "prevents sunburn and long-term damage"],
        "time": ["morning"],
        "suits": ["dry", "oily", "combination", "sensitive", "normal", "acne-prone", "mature"],
        "how": ["Use about two finger lengths for the face and neck as the last step each morning.",
                "Reapply every two hours when you are outdoors."],
        "caution": ["Even the best serum cannot replace it."],
    },
}

STEP_NOUNS = {
    "cleanser": "cleanser", "toner": "toner", "serum": "serum", "moisturizer": "moisturizer",
    "sunscreen": "sunscreen", "night": "treatment", "exfoliant": "exfoliant",
}

GENERAL_TIPS = [
    "Introduce one new product at a time and give it a couple of weeks.",
    "Patch test new products on a small area first.",
    "Consistency matters more than the number of products you use.",
    "Wear sunscreen every day, even when it is cloudy.",
    "Apply products from the thinnest to the thickest texture.",
    "Keep your routine simple at first, then add steps if you need them.",
    "Wash your face with lukewarm water rather than hot water.",
    "Always remove makeup and sunscreen before bed.",
    "Drink enough water and get enough sleep; your skin will show it.",
    "Change your pillowcase once or twice a week.",
    "Pat products in gently instead of rubbing.",
    "Give your skin about four weeks to show results.",
]

CAUTIONS = [
    "If anything stings, burns or causes a rash, stop using it.",
    "If your skin stays irritated, talk to a dermatologist.",
    "Do not combine several strong actives in the same routine.",
    "Avoid retinoids if you are pregnant or breastfeeding.",
    "Acids and retinoids make the skin more sensitive to the sun, so never skip sunscreen.",
    "For a skin condition that does not improve, see a dermatologist.",
]

# --------------------------------------------------------------------------- prompts

ROUTINE_PROMPTS = [
    "Suggest a skincare routine", "Suggest a skincare routine.",
    "Suggest a simple skincare routine",
    "What is a good skincare routine?", "Can you recommend a daily skincare routine?",
    "Give me a basic skincare routine.", "What skincare routine should I follow?",
    "I want to start taking care of my skin. Where do I begin?", "Recommend a skincare routine",
    "What's a good routine for my face?", "Help me build a skincare routine.",
    "What steps should a skincare routine have?", "suggest a skincare routine",
    "Please suggest a skincare routine for me.", "Describe a simple daily skincare routine.",
]
TYPE_PROMPTS = [
    "Suggest a skincare routine for {t}", "Suggest a skincare routine for {t}.",
    "What is a good skincare routine for {t}?", "I have {t}. What routine should I follow?",
    "Recommend a routine for {t}.", "How should I take care of {t}?",
    "What skincare products are best for {t}?", "Give me a daily routine for {t}.",
    "Can you suggest a simple routine for {t}?", "suggest a skincare routine for {t}",
    "What's the best way to care for {t}?", "My skin is {short}. What should I use?",
    "Build me a skincare routine for {t}.",
]
TIME_PROMPTS = [
    "What should my {time} skincare routine be?", "Suggest a {time} skincare routine",
    "Suggest a {time} routine for {t}", "What should I use for {t} in the {time}?",
    "What is a good {time} routine for {t}?", "Give me a {time} routine for {t}.",
    "How should I care for {t} in the {time}?", "What should I put on my face in the {time}?",
]
CONCERN_PROMPTS = [
    "What should I use for {c}?", "How can I get rid of {c}?", "Suggest a routine for {c}.",
    "What helps with {c}?", "I struggle with {c}. What should I do?",
    "Suggest a skincare routine for {c}", "What is the best routine for {c}?",
    "How do I treat {c}?", "What should I use for {c} in the {time}?",
    "Which ingredients help with {c}?",
]
INGREDIENT_PROMPTS = [
    "What does {i} do?", "Is {i} good for {t}?", "How should I use {i}?",
    "When should I apply {i}?", "Should I add {i} to my routine?", "Tell me about {i}.",
    "What is {i} good for?", "Can I use {i} every day?",
]

TIMES = {"morning": ["morning", "AM"], "evening": ["evening", "night", "PM", "nighttime"]}


# --------------------------------------------------------------------------- rendering helpers

class _Writer:
    """Holds the seeded RNG and small helpers for picking phrasings."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return self.rng.choice(list(options))

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# A step is (kind, product phrase). Each kind has clause templates (imperative verb phrases)
# and short reasons, so the same step can be rendered as prose, a list item or a label line.
STEP_CLAUSES: dict[str, list[str]] = {
    "cleanser": ["cleanse with {p}", "wash your face with {p}", "use {p} to clean your skin",
                 "massage {p} over damp skin and rinse with lukewarm water",
                 "start with {p}", "clean your face with {p}"],
    "toner": ["apply {p}", "pat on {p}", "sweep {p} over your face", "use {p}"],
    "serum": ["apply {p}", "press in {p}", "smooth on {p}", "follow with {p}", "use {p}"],
    "moisturizer": ["moisturize with {p}", "apply {p}", "seal everything in with {p}",
                    "smooth on {p}", "follow with {p}", "use {p}"],
    "sunscreen": ["finish with {p}", "apply {p}", "protect your skin with {p}",
                  "never skip {p}", "put on {p}", "use {p}"],
    "night": ["add {p}", "apply {p}", "use {p}", "treat the skin with {p}"],
    "exfoliant": ["exfoliate with {p}", "use {p}", "add {p}"],
}
STEP_REASONS: dict[str, list[str]] = {
    "cleanser": ["to remove dirt and oil without stripping the skin",
                 "so the skin is clean but not tight", "to clear away sweat and oil",
                 "to remove sunscreen, makeup and dirt from the day"],
    "toner": ["to add a first layer of hydration", "to balance the skin",
              "to prepare the skin for the next steps"],
    "serum": ["to target your main concern", "while your skin is still slightly damp",
              "and let it absorb for a minute", "to give the skin a boost of active ingredients"],
    "moisturizer": ["to keep the skin soft and hydrated", "to support the skin barrier",
                    "to lock in moisture", "so the skin stays comfortable all day"],
    "sunscreen": ["to protect against UV damage", "to prevent dark spots and early wrinkles",
                  "because daily protection is the most important step"],
    "night": ["while the skin repairs itself overnight", "to work while you sleep",
              "for extra care at night"],
    "exfoliant": ["to remove dead skin cells", "to keep the surface smooth",
                  "to help the skin look brighter"],
}
TRANSITIONS_FIRST = ["First, ", "To start, ", "Begin by ", "Start by ", ""]
TRANSITIONS_MID = ["Next, ", "Then ", "After that, ", "Once that has absorbed, ", "Afterwards, ",
                   "Now ", "Then, ", ""]
TRANSITIONS_LAST = ["Finally, ", "Last, ", "To finish, ", "As the last step, ", "Then ", ""]
GERUNDS = {"use": "using", "massage": "massaging", "wash": "washing", "clean": "cleaning",
           "cleanse": "cleansing", "apply": "applying", "smooth": "smoothing", "pat": "patting",
           "press": "pressing", "sweep": "sweeping", "follow": "following",
           "finish": "finishing", "moisturize": "moisturizing", "seal": "sealing",
           "protect": "protecting", "put": "putting", "add": "adding", "treat": "treating",
           "exfoliate": "exfoliating"}


def _clause(w: _Writer, kind: str, product: str, reason: bool, used: set[str]) -> str:
    """An imperative clause for one step, preferring a verb not used yet in this answer."""
    options = [c for c in STEP_CLAUSES[kind] if c.split()[0] not in used] or STEP_CLAUSES[kind]
    text = w.pick(options).format(p=product)
    used.add(text.split()[0])
    if reason:
        text += " " + w.pick(STEP_REASONS[kind])
    return text


def _lead(w: _Writer, options: list[str], clause: str) -> str:
    """A transition that does not repeat the clause's verb ("To start, start with")."""
    verb = clause.split()[0]
    fitting = [o for o in options if verb not in o.lower()
               and not (o in ("Begin by ", "Start by ") and verb not in GERUNDS)]
    return w.pick(fitting or [""])


def _gerund(clause: str) -> str:
    verb, _, rest = clause.partition(" ")
    return GERUNDS[verb] + " " + rest


def _strip_time(product: str) -> str:
    return product.replace(" in the morning", "").replace(" at night", "")


def _steps_for(w: _Writer, profile: dict[str, list[str]], time: str, minimal: bool,
               concern: dict[str, list[str]] | None) -> list[tuple[str, str]]:
    steps = [("cleanser", w.pick(profile["cleanser"]))]
    if not minimal and w.chance(0.3):
        steps.append(("toner", w.pick(profile["toner"])))
    if concern is not None and (time == "evening" or w.chance(0.4)):
        # Treatments that name a time of day go only in that part of the routine.
        fits = [t for t in concern["treatment"]
                if not (" in the morning" in t and time == "evening")
                and not (" at night" in t and time == "morning")
                and not ("retino" in t and time == "morning")]
        treatment = _strip_time(w.pick(fits or concern["treatment"]))
        steps.append(("night" if time == "evening" else "serum", treatment))
    elif not minimal and w.chance(0.75):
        steps.append(("serum", w.pick(profile["serum"])))
    steps.append(("moisturizer", w.pick(profile["moisturizer"])))
    if time == "morning":
        steps.append(("sunscreen", w.pick(profile["sunscreen"])))
    elif not minimal and concern is None and w.chance(0.6):
        # An occlusive extra goes over the moisturizer; an active goes before it.
        extra = w.pick(profile["night"])
        if any(word in extra for word in ("oil", "mask", "balm", "layer", "squalane")):
            steps.append(("night", extra))
        else:
            steps.insert(-1, ("night", extra))
    return steps


def _render_prose(w: _Writer, steps: list[tuple[str, str]], lead_first: bool = True) -> str:
    sentences, used = [], set()
    for i, (kind, product) in enumerate(steps):
        clause = _clause(w, kind, product, w.chance(0.4), used)
        if i == 0:
            lead = _lead(w, TRANSITIONS_FIRST, clause) if lead_first else ""
            if lead in ("Begin by ", "Start by "):
                clause = _gerund(clause)
        elif i == len(steps) - 1:
            lead = _lead(w, TRANSITIONS_LAST, clause)
        else:
            lead = _lead(w, TRANSITIONS_MID, clause)
        sentences.append(_cap(lead + clause) + ".")
    return " ".join(sentences)


def _render_numbered(w: _Writer, steps: list[tuple[str, str]]) -> str:
    lines, used = [], set()
    for i, (kind, product) in enumerate(steps, start=1):
        if w.chance(0.5):
            text = f"{STEP_NOUNS[kind].capitalize()}: {product}"
            if w.chance(0.3):
                text += " " + w.pick(STEP_REASONS[kind])
        else:
            text = _cap(_clause(w, kind, product, w.chance(0.3), used))
        lines.append(f"{i}. {text}.")
    return "\n".join(lines)


def _render_compact(w: _Writer, steps: list[tuple[str, str]]) -> str:
    used: set[str] = set()
    return _cap(_join([_clause(w, kind, product, False, used) for kind, product in steps])) + "."


def _render_steps(w: _Writer, steps: list[tuple[str, str]], style: str) -> str:
    if style == "numbered":
        return _render_numbered(w, steps)
    return _render_compact(w, steps) if style == "compact" else _render_prose(w, steps)


def _section(w: _Writer, time: str, steps: list[tuple[str, str]], style: str) -> str:
    morning = time == "morning"
    if style == "numbered":
        head = w.pick(["Morning:", "In the morning:", "AM routine:", "Morning routine:"]
                      if morning else ["Evening:", "At night:", "PM routine:", "Night:",
                                       "Evening routine:"])
        return head + "\n" + _render_numbered(w, steps)
    head = w.pick(["In the morning, ", "Each morning, ", "For the morning, ", "Every morning, "]
                  if morning else ["In the evening, ", "At night, ", "Before bed, ",
                                   "Every evening, "])
    body = (_render_compact(w, steps) if style == "compact"
            else _render_prose(w, steps, lead_first=False))
    return head + body[:1].lower() + body[1:]


# --------------------------------------------------------------------------- answers

def _intro_for_type(w: _Writer, name: str, profile: dict[str, list[str]]) -> str:
    goal = w.pick(profile["goal"])
    return w.pick([
        f"For {name}, the goal is to {goal}.",
        f"For {name}, I recommend a gentle routine that helps {goal}.",
        f"A good routine for {name} should {goal}.",
        f"Here is a simple routine for {name}.",
        f"{_cap(name)} needs a routine that helps {goal}.",
        f"Here is a routine that suits {name}; it aims to {goal}.",
        f"When you have {name}, the main aim is to {goal}.",
        f"I would suggest a routine that helps {goal}.",
    ])


def _intro_general(w: _Writer) -> str:
    return w.pick([
        "Here is a simple daily routine that suits most skin types.",
        "A good basic routine has three main steps: cleanse, moisturize and protect.",
        "A simple routine works better than a complicated one you cannot keep up.",
        "Here is an easy routine to start with.",
        "Most people do well with a short morning and evening routine.",
        "A basic skincare routine only needs a few products.",
        "Start with the essentials and add more only if your skin needs it.",
        "I recommend a simple routine built around a few gentle products.",
        "Here is a routine that works for most people.",
    ])


def _outro(w: _Writer, extra: Sequence[str] = ()) -> list[str]:
    out = []
    if w.chance(0.6):
        out.append(w.pick(list(extra) + GENERAL_TIPS))
    if w.chance(0.35):
        out.append(w.pick(CAUTIONS))
    return out


def _avoid_sentence(w: _Writer, name: str, profile: dict[str, list[str]]) -> str:
    items = _join(w.rng.sample(profile["avoid"], k=min(2, len(profile["avoid"]))))
    return w.pick([
        f"Avoid {items}.",
        f"Try to avoid {items}.",
        f"With {name}, it is best to avoid {items}.",
        f"Stay away from {items}, since they can make things worse.",
    ])


def routine_answer(w: _Writer, skin: str | None, time: str | None,
                   concern: str | None = None) -> str:
    """A routine for an optional skin type, time of day ('morning'/'evening') and concern."""
    profile = SKIN_TYPES[skin or w.pick(["normal", "normal", "combination"])]
    concern_kb = CONCERNS[concern] if concern else None
    name = w.pick(profile["names"]) if skin else "your skin"
    style = w.pick(["prose", "prose", "numbered", "compact"])
    minimal = w.chance(0.3)
    parts: list[str] = []
    if concern_kb:
        cname = w.pick(concern_kb["names"][:2])
        actives = w.rng.sample(concern_kb["actives"], k=2)
        parts.append(w.pick([
            f"For {cname}, look for products with {_join(actives)}.",
            f"{_cap(_join(actives))} are the ingredients that help most with {cname}.",
            f"To help with {cname}, build your routine around {actives[0]} or {actives[1]}.",
            f"Ingredients like {_join(actives)} work well for {cname}.",
        ]))
    elif skin:
        parts.append(_intro_for_type(w, name, profile))
    elif w.chance(0.8):
        parts.append(_intro_general(w))
    times = [time] if time else (["morning", "evening"] if w.chance(0.75) else [])
    if not times:  # a single routine without time sections
        parts.append(_render_steps(w, _steps_for(w, profile, "morning", minimal, concern_kb),
                                   style))
    else:
        for t in times:
            steps = _steps_for(w, profile, t, minimal or len(times) > 1, concern_kb)
            parts.append(_section(w, t, steps, style))
        if time == "evening" and w.chance(0.4):
            parts.append(w.pick(["Skip sunscreen at night, but never skip it in the morning.",
                                 "In the morning, keep it simple and finish with sunscreen."]))
    if skin and w.chance(0.4):
        parts.append(_avoid_sentence(w, name, profile))
    if skin and not concern and w.chance(0.3):
        parts.append(w.pick(["You can also add ", "If you like, add ", "For smoother skin, use "])
                     + w.pick(profile["exfoliant"]) + ".")
    parts += _outro(w, concern_kb["tips"] + concern_kb["caution"] if concern_kb else ())
    return _finish(parts, style)


def _finish(parts: list[str], style: str) -> str:
    """Join sentences (list layouts keep one paragraph per line), dropping optional trailing
    sentences until the answer fits the length budget."""
    sep = "\n" if style == "numbered" else " "
    while len(parts) > 2 and len(sep.join(parts).split()) > MAX_ANSWER_WORDS:
        parts = parts[:-1]
    return sep.join(parts)


def ingredient_answer(w: _Writer, ingredient: str, skin: str | None) -> str:
    kb = INGREDIENTS[ingredient]
    does = w.pick(kb["does"])
    plural = ingredient == "ceramides"
    it, it_is = ("they", "they are") if plural else ("it", "it is")
    name = _cap(ingredient)
    parts = [w.pick([
        f"{name} {does}.",
        f"{name} are lipids that {does}." if plural else f"{name} is an ingredient that {does}.",
        f"In short, {ingredient} {does}.",
        f"{name} mainly {does}.",
    ])]
    if skin is not None:
        skin_name = w.pick(SKIN_TYPES[skin]["names"])
        if skin in kb["suits"]:
            parts.append(w.pick([f"Yes, {it} {'work' if plural else 'works'} well for {skin_name}.",
                                 f"{_cap(it_is)} a good choice for {skin_name}.",
                                 f"{_cap(it)} {'suit' if plural else 'suits'} {skin_name}."]))
        else:
            parts.append(w.pick([f"{_cap(it)} can work for {skin_name}, but introduce "
                                 f"{'them' if plural else 'it'} slowly.",
                                 f"With {skin_name}, use {'them' if plural else 'it'} carefully "
                                 "and watch how your skin reacts.",
                                 f"{_cap(it_is)} not the first thing to reach for with "
                                 f"{skin_name}; start gently."]))
    when = kb["time"][0]
    obj = "them" if plural else "it"
    if " or " in when:
        parts.append(w.pick([f"You can use {obj} in the morning or in the evening.",
                             f"{_cap(it)} {'fit' if plural else 'fits'} into either routine, "
                             "morning or night."]))
    else:
        parts.append(w.pick([f"Use {obj} in the {when}.",
                             f"The best time to apply {obj} is the {when}.",
                             f"{_cap(it)} {'belong' if plural else 'belongs'} in your {when} "
                             "routine."]))
    parts.append(w.pick(kb["how"]))
    if w.chance(0.7):
        parts.append(w.pick(kb["caution"]))
    parts += _outro(w)[:1]
    return _finish(parts, "prose")


def concern_answer(w: _Writer, concern: str, time: str | None) -> str:
    kb = CONCERNS[concern]
    if w.chance(0.55) or time:
        return routine_answer(w, w.pick(kb["skins"]), time, concern)
    cname = w.pick(kb["names"])
    actives = w.rng.sample(kb["actives"], k=3)
    parts = [w.pick([
        f"The ingredients that help most with {cname} are {_join(actives)}.",
        f"For {cname}, look for {_join(actives)}.",
        f"When it comes to {cname}, {_join(actives)} are worth trying.",
    ])]
    treatment = w.pick(kb["treatment"])
    parts.append(w.pick([
        f"A simple plan is to cleanse gently, use {treatment}, moisturize, "
        "and wear sunscreen every morning.",
        f"Add {treatment} to your routine and keep everything else gentle.",
        f"Try {treatment} after cleansing, then follow with a moisturizer.",
    ]))
    parts += w.rng.sample(kb["tips"], k=min(2, len(kb["tips"])))
    parts.append(w.pick(kb["caution"]))
    return _finish(parts, "prose")


# Fixed questions about routine mechanics, each with several interchangeable sentence pools.
FAQ: list[tuple[list[str], list[list[str]]]] = [
    (["How often should I exfoliate?", "How many times a week should I exfoliate?",
      "Is it okay to exfoliate every day?"],
     [["Most people should exfoliate one to three times a week.",
       "For most skin types, two or three times a week is enough.",
       "Exfoliating once or twice a week is plenty for most people."],
      ["Sensitive or dry skin may only need it once a week.",
       "Oily skin can handle a little more, but watch for redness.",
       "If your skin feels tight or stings, cut back."],
      ["Chemical exfoliants such as lactic or salicylic acid are gentler than rough scrubs.",
       "A leave-on acid is usually kinder to the skin than a gritty scrub."],
      ["Always wear sunscreen the next morning, because exfoliated skin burns more easily.",
       "Do not exfoliate on the same night as retinol."]]),
    (["Do I really need sunscreen every day?", "Should I wear sunscreen when it is cloudy?",
      "Is sunscreen necessary in winter?"],
     [["Yes, daily sunscreen is the most important step in any routine.",
       "Yes. UV light reaches your skin even on cloudy days and through windows.",
       "Yes, you need it every day, in every season."],
      ["It prevents sunburn, dark spots and early wrinkles.",
       "Sun damage builds up over time, even when you do not feel it."],
      ["Choose a broad-spectrum sunscreen with SPF 30 or higher.",
       "Pick a texture you enjoy wearing, so you use it every day."],
      ["Apply it as the last step of your morning routine and reapply when you are outside.",
       "Use about two finger lengths for the face and neck."]]),
    (["What order should I apply my skincare products in?", "In what order do I apply skincare?",
      "Which comes first, serum or moisturizer?"],
     [["A simple rule is to go from the thinnest texture to the thickest.",
       "Apply products from the lightest to the richest."],
      ["Start with cleanser, then toner if you use one, then serum, then moisturizer.",
       "Cleanse first, then apply any toner or serum, and follow with moisturizer."],
      ["In the morning, sunscreen is always the last step.",
       "Sunscreen goes on last in the morning, over your moisturizer."],
      ["Wait a minute between layers so each one can absorb.",
       "Treatments such as retinol usually go on before moisturizer at night."]]),
    (["Do I need a toner?", "Is toner necessary?", "What does a toner do?"],
     [["A toner is optional.", "You do not strictly need a toner.",
       "Toner is one of the most optional steps."],
      ["Modern toners mostly add a light layer of hydration or a mild active ingredient.",
       "A hydrating toner can help dry skin, and a toner with a little acid can help oily skin."],
      ["Avoid toners with a lot of alcohol, which can dry and irritate the skin.",
       "If your routine already feels complete, you can skip it."]]),
    (["Should I moisturize if I have oily skin?", "Does oily skin need moisturizer?"],
     [["Yes, oily skin still needs moisturizer.", "Yes. Oil and water are not the same thing."],
      ["Skipping it can leave the skin dehydrated, and it may make even more oil.",
       "Without moisture, the skin barrier weakens and can become irritated."],
      ["Choose a lightweight gel or an oil-free lotion labelled non-comedogenic.",
       "A light gel cream gives hydration without shine."]]),
    (["How do I start using retinol?", "How should a beginner use retinol?",
      "What is the right way to introduce retinol?"],
     [["Start with a low strength, two or three nights a week.",
       "Begin with a gentle retinol twice a week and increase slowly."],
      ["Apply a pea-sized amount to dry skin after cleansing, then moisturize.",
       "Use a small amount at night and follow with a simple moisturizer."],
      ["Some dryness and peeling in the first weeks is normal.",
       "If your skin gets irritated, take a few nights off."],
      ["Wear sunscreen every morning, because retinol makes the skin more sensitive to sun.",
       "Avoid retinol during pregnancy, and do not use it on the same night as strong acids."]]),
    (["Can I use vitamin C and retinol together?", "Can I mix retinol and vitamin C?"],
     [["Yes, but it is easiest to use them at different times of day.",
       "You can use both, just not necessarily at the same time."],
      ["Use vitamin C in the morning under sunscreen and retinol at night.",
       "Vitamin C works well in the morning, and retinol belongs in the evening routine."],
      ["This keeps irritation low and lets each one do its job.",
       "Splitting them also lowers the risk of redness."]]),
    (["How long should I wait between skincare steps?", "Do I need to wait between products?"],
     [["A minute or two between steps is usually enough.",
       "You only need to wait until each layer no longer feels wet."],
      ["Give sunscreen a few minutes to set before you apply makeup.",
       "With retinol, some people wait longer to reduce irritation."],
      ["There is no need to wait long for gentle hydrating products.",
       "Patting products in helps them absorb faster."]]),
    (["What is a simple three-step routine?", "I want a minimal routine.",
      "What are the most important skincare steps?"],
     [["Three steps cover the basics: cleanse, moisturize and protect.",
       "A minimal routine needs only three products."],
      ["In the morning, use a gentle cleanser, a moisturizer and sunscreen.",
       "Wash with a mild cleanser, apply a moisturizer that suits your skin, "
       "and finish with SPF 30 in the morning."],
      ["At night, cleanse and moisturize.",
       "In the evening, just cleanse well and moisturize."],
      ["Add a serum later if you want to target a specific concern.",
       "Once this feels easy, you can add one treatment at a time."]]),
    (["How should I care for my skin in winter?", "What should I change in my routine for winter?"],
     [["Cold air and heating dry the skin, so focus on hydration.",
       "In winter, the skin loses more water, so switch to richer products."],
      ["Use a creamy cleanser and a thicker moisturizer with ceramides.",
       "Swap a gel moisturizer for a cream, and add a hydrating serum."],
      ["Keep wearing sunscreen; UV light is still there in winter.",
       "A humidifier at night helps too."]]),
    (["How should I change my routine in summer?", "What skincare is best for hot weather?"],
     [["In summer, switch to lighter textures such as gels and fluids.",
       "Heat and humidity call for lighter products."],
      ["Use a gentle gel cleanser and a light moisturizer.",
       "A water-based moisturizer keeps the skin hydrated without feeling heavy."],
      ["Reapply sunscreen every two hours outdoors and after swimming.",
       "Wear a hat and seek shade in the middle of the day."]]),
]


def faq_answer(w: _Writer, pools: list[list[str]]) -> str:
    # The question's direct answer always comes first; at least two more sentences follow.
    rest = [w.pick(pool) for pool in pools[1:]]
    keep = [s for s in rest if w.chance(0.85)]
    parts = [w.pick(pools[0])] + (keep if len(keep) >= 2 else rest)
    if w.chance(0.3):
        parts.append(w.pick(GENERAL_TIPS))
    return _finish(parts, "prose")


# --------------------------------------------------------------------------- examples

def _short_name(skin: str) -> str:
    return {"acne-prone": "prone to acne", "mature": "aging"}.get(skin, skin)


def _type_name(w: _Writer, skin: str) -> str:
    return w.pick([f"{skin} skin", f"{skin} skin", SKIN_TYPES[skin]["names"][1]])


def _make_routine(w: _Writer) -> Example:
    return Example(w.pick(ROUTINE_PROMPTS), routine_answer(w, None, None))


def _make_type(w: _Writer) -> Example:
    skin = w.pick(list(SKIN_TYPES))
    prompt = w.pick(TYPE_PROMPTS).format(t=_type_name(w, skin), short=_short_name(skin))
    return Example(prompt, routine_answer(w, skin, None))


def _make_time(w: _Writer) -> Example:
    skin = w.pick(list(SKIN_TYPES))
    time = w.pick(list(TIMES))
    template = w.pick(TIME_PROMPTS)
    prompt = template.format(t=_type_name(w, skin), time=w.pick(TIMES[time]))
    return Example(prompt, routine_answer(w, skin if "{t}" in template else None, time))


def _make_concern(w: _Writer) -> Example:
    concern = w.pick(list(CONCERNS))
    template = w.pick(CONCERN_PROMPTS)
    time = w.pick(list(TIMES)) if "{time}" in template else None
    prompt = template.format(c=w.pick(CONCERNS[concern]["names"]),
                             time=w.pick(TIMES[time]) if time else "")
    return Example(prompt, concern_answer(w, concern, time))


def _make_ingredient(w: _Writer) -> Example:
    ingredient = w.pick(list(INGREDIENTS))
    template = w.pick(INGREDIENT_PROMPTS)
    skin = w.pick(list(SKIN_TYPES)) if "{t}" in template else None
    prompt = template.format(i=ingredient, t=_type_name(w, skin) if skin else "")
    return Example(prompt, ingredient_answer(w, ingredient, skin))


def _make_faq(w: _Writer) -> Example:
    prompts, pools = w.pick(FAQ)  # type: ignore[arg-type]
    return Example(w.pick(prompts), faq_answer(w, pools))


# Mixture weights: routine questions dominate, as they are the seed's prompts.
MAKERS: list[tuple[Callable[[_Writer], Example], float]] = [
    (_make_routine, 0.2), (_make_type, 0.3), (_make_time, 0.15), (_make_concern, 0.15),
    (_make_ingredient, 0.1), (_make_faq, 0.1),
]


def generate_corpus(n: int, seed: int = 0) -> list[Example]:
    """`n` question/answer pairs; the same seed always gives the same list."""
    w = _Writer(random.Random(seed))
    makers, weights = zip(*MAKERS, strict=True)
    return [w.rng.choices(makers, weights)[0](w) for _ in range(n)]
