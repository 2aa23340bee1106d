from shared.metrics import contains, exact_match, normalize, token_f1


def test_normalize_strips_accents_punctuation_articles():
    assert normalize("  The Reykjavík, Iceland! ") == "reykjavik iceland"


def test_exact_match_and_contains():
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("The capital is Paris.", ["Paris"]) == 0.0
    assert contains("The capital of France is Paris.", ["Paris"]) == 1.0
    assert contains("Parisian cafes", ["Paris"]) == 0.0  # whole words only
    assert contains("anything", [""]) == 0.0


def test_token_f1_by_hand():
    # pred {capital, is, paris} vs gold {paris}: p=1/3, r=1 -> f1 = 0.5
    assert token_f1("capital is Paris", ["Paris"]) == 0.5
    assert token_f1("Lyon", ["Paris", "Lyon"]) == 1.0
    assert token_f1("", ["Paris"]) == 0.0
