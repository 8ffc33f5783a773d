"""Answers checked against the question: the expected answer type from the question's
wording, the answer's form, and typed grounding in the evidence (atlas_jax/ledger/checks.py)."""
import pytest

from atlas_jax.ledger.checks import check_answer, grounding
from atlas_jax_tasks import ledger_query
from atlas_jax_tasks.ledger_phrasing import TEMPLATES

VOCABULARY = ledger_query.LedgerVocabulary(
    payees=("Balance Fitness", "Kin Soy"),
    accounts=("Liabilities:US:Chase:Slate", "Expenses:Food:Groceries",
              "Expenses:Food:Restaurant"))
EXPECTED = {"payment_amount": "amount", "expense_account": "account", "payee_of": "payee",
            "balance": "balance", "monthly_total": "amount"}
EVIDENCE = [
    {"id": "a", "text": '2021-01-14 * "Kin Soy" "Eating out"\n'
                        "  Liabilities:US:Chase:Slate  -25.84 USD\n"
                        "  Expenses:Food:Restaurant     25.84 USD",
     "metadata": {"date": "2021-01-14", "payee": "Kin Soy", "narration": "Eating out",
                  "accounts": ["Liabilities:US:Chase:Slate", "Expenses:Food:Restaurant"]}},
    {"id": "b", "text": "2021-02-10 balance Assets:US:BofA:Checking  2,973.33 USD",
     "metadata": {"date": "2021-02-10", "payee": "", "narration": "",
                  "accounts": ["Assets:US:BofA:Checking"]}}]


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_every_template_asks_for_its_type(kind):
    for template in TEMPLATES[kind]:
        # a payee whose name is a type word does not change the type
        question = template.format(payee="Balance Fitness", date="March 3, 2022",
                                   amount="40.88 USD", account="Liabilities:US:Chase:Slate",
                                   category="Expenses:Food:Groceries", month="March 2022",
                                   category_word="groceries")
        assert ledger_query.parse_query(question, VOCABULARY).answer_type == EXPECTED[kind], \
            question


def test_other_wordings():
    parse = ledger_query.parse_query
    assert parse("When did I last pay Kin Soy?", VOCABULARY).answer_type == "date"
    assert parse("To whom did I pay 12.00 USD?", VOCABULARY).answer_type == "payee"
    assert parse("Tell me about January", VOCABULARY).answer_type is None


@pytest.mark.parametrize("answer,form", [
    ("40.88 USD", "amount"), ("-1,200.00", "amount"), ("$45.60", "amount"),
    ("Expenses:Food", "account"), ("Kin Soy", "text"), ("2021-01-05", "date"), ("  ", None)])
def test_answer_forms(answer, form):
    assert ledger_query.answer_type_of(answer) == form


def test_typed_grounding():
    assert grounding("25.84 USD", EVIDENCE, "amount") == ["a"]
    assert grounding("$2973.33", EVIDENCE, "balance") == ["b"]
    assert grounding("23.34 USD", EVIDENCE, "amount") == []
    assert grounding("14 USD", EVIDENCE, "amount") == []        # a date's day is no amount
    assert grounding("Kin soy", EVIDENCE, "payee") == ["a"]
    assert grounding("Kin", EVIDENCE, "payee") == []            # part of a name is not it
    assert grounding("Expenses:Food:Restaurant", EVIDENCE, "account") == ["a"]
    assert grounding("Expenses:Food", EVIDENCE, "account") == []
    assert grounding("2021-02-10", EVIDENCE, "date") == ["b"]
    # untyped: numbers must match, names appear in the text
    assert grounding("Expenses:Food:Restaurant", EVIDENCE) == ["a"]
    assert grounding("Chichipotle", EVIDENCE) == grounding("", EVIDENCE) == []


def test_wrong_type_is_never_confident():
    # an amount to "who was paid", an account to "who did I pay", a payee to "how much"
    for answer, answer_type in (("25.84 USD", "payee"), ("Expenses:Food:Restaurant", "payee"),
                                ("Kin Soy", "amount"), ("Kin Soy", "account")):
        checked = check_answer(answer, answer_type, EVIDENCE, 0.99, 0.5)
        assert checked["low_confidence"], (answer, answer_type)
        assert any(reason.startswith(f"the question asks for a {answer_type}")
                   for reason in checked["why_low"])
    right = check_answer("Kin Soy", "payee", EVIDENCE, 0.99, 0.5)
    assert not right["low_confidence"] and right["grounded_in"] == ["a"]
    assert check_answer("Kin Soy", "payee", EVIDENCE, 0.2, 0.5)["low_confidence"]
    unmatched = check_answer("Kin Soy", "payee", EVIDENCE, 0.99, 0.5, ["date=1999-01-01"])
    assert unmatched["why_low"][0].startswith("no ledger entry matches the filters")


def test_grounded_beam_selection():
    """Of the beams (best first), the most likely answer of the asked form that the evidence
    states; else the most likely of the asked form; else the best beam."""
    from atlas_jax.ledger.checks import choose_beam
    # the year's piece as the dollars (23.84) loses to the amount the entry states
    assert choose_beam(["23.84 USD", "25.84 USD", "Kin Soy"], "amount", EVIDENCE) == 1
    # an amount to "who" loses to the payee
    assert choose_beam(["25.84 USD", "Laut", "Kin Soy"], "payee", EVIDENCE) == 2
    assert choose_beam(["Liabilities:US:Chase:Slate", "Expenses:Food:Restaurant"], "account",
                       EVIDENCE) == 0
    # nothing stated: the first of the asked form; nothing of the form: the best beam
    assert choose_beam(["Kin Soy", "31.00 USD", "12.00 USD"], "amount", EVIDENCE) == 1
    assert choose_beam(["Kin Soy", "Laut"], "amount", EVIDENCE) == 0
    assert choose_beam(["", "2,973.33 USD"], "balance", EVIDENCE) == 1
    assert choose_beam(["25.84 USD"], "amount", []) == 0
    # grounded in an entry that satisfies the question's filters beats grounded elsewhere
    assert choose_beam(["Kin Soy", "2,973.33 USD"], None, EVIDENCE, EVIDENCE[1:]) == 1
    assert choose_beam(["Kin Soy", "2,973.33 USD"], None, EVIDENCE) == 0


def test_the_ledger_selector_does_not_ground_totals():
    """A month's total is stated by no entry: the selector keeps the best amount rather than
    an entry's amount; a one-day question is grounded."""
    from atlas_jax.ledger.filters import ledger_answer_selector
    beams = ["70.00 USD", "25.84 USD"]
    chosen = ledger_answer_selector(
        ["How much did I spend on restaurants in January 2021?",
         "How much did I pay Kin Soy on 14 Jan 2021?"], [beams, beams], [EVIDENCE, EVIDENCE],
        None)
    assert chosen == [0, 1]


def test_the_ledger_selector_prefers_the_entry_the_question_names():
    """Two entries read, each stating one of the beams: the payee of the entry whose date and
    amount the question names wins, though the other is more likely."""
    from atlas_jax.ledger.filters import ledger_answer_selector, satisfying
    other = {"id": "c", "text": '2021-01-05 * "Goba Goba" "Eating out"\n'
                                "  Liabilities:US:Chase:Slate  -12.00 USD\n"
                                "  Expenses:Food:Restaurant     12.00 USD",
             "metadata": {"date": "2021-01-05", "payee": "Goba Goba", "amount": 12.0,
                          "accounts": ["Expenses:Food:Restaurant"]}}
    named = {"id": "d", "text": '2021-01-05 * "Kin Soy" "Eating out"\n'
                                "  Liabilities:US:Chase:Slate  -40.88 USD\n"
                                "  Expenses:Food:Restaurant     40.88 USD",
             "metadata": {"date": "2021-01-05", "payee": "Kin Soy", "amount": 40.88,
                          "accounts": ["Expenses:Food:Restaurant"]}}
    question = "Who was the payee of the 40.88 USD payment on 5 Jan 2021?"
    assert satisfying([other, named], ["date=2021-01-05", "amount=40.88"]) == [named]
    assert satisfying([other, named], ["nosuchfield=1"]) == []
    assert ledger_answer_selector([question], [["Goba Goba", "Kin Soy"]], [[other, named]],
                                  None) == [1]
    assert ledger_answer_selector([question], [["Goba Goba", "Kin Soy"]], [[other]],
                                  None) == [0]
