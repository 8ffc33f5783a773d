"""Surface forms for the ledger QA task: dates, months, amounts, payees, question templates.

The ledger itself writes ISO dates and `45.60 USD`; questions mix those with spelled-out forms
so that retrieval cannot succeed by copying strings (see issue 4). Each question records the
forms it used in its `phrasing` dict, so results can be split by them:

  date:   iso `2023-03-14` | long `March 14, 2023` | short `14 Mar 2023` | us `3/14/2023` |
          ordinal `the 14th of March 2023` (months: `2023-03`, `March 2023`, `Mar 2023`,
          `3/2023`, `the 3rd month of 2023`)
  amount: currency `45.60 USD` | dollar_sign `$45.60` (`$2,400.00`) | words `45.6 dollars`
  payee:  ledger `Whole Foods` | lower `whole foods`
  (`none` where the question does not mention that element)

Answers list several acceptable forms of the same value (`answer_forms_*`); the first is the
form written in the ledger.
"""
from __future__ import annotations

import datetime
import random
from decimal import Decimal

DATE_STYLES = ("iso", "long", "short", "us", "ordinal")
AMOUNT_STYLES = ("currency", "dollar_sign", "words")
PAYEE_STYLES = ("ledger", "lower")
NOT_MENTIONED = "none"
OPERATING_CURRENCY = "USD"

MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
               "September", "October", "November", "December")

# Question templates per kind. Fields: {payee} {date} {amount} {account} {category}
# {category_word} {month}. Each kind has several phrasings of the same question.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "payment_amount": (
        "How much did I pay {payee} on {date}?",
        "What was the amount of the {payee} payment on {date}?",
        "On {date}, how much was spent at {payee}?",
        "How much money went to {payee} on {date}?",
    ),
    "expense_account": (
        "Which expense account was the {payee} payment on {date} booked to?",
        "Under which expense account did the {date} transaction with {payee} go?",
        "What account recorded the expense paid to {payee} on {date}?",
    ),
    "payee_of": (
        "Who did I pay {amount} on {date}?",
        "Which payee received {amount} on {date}?",
        "On {date}, who was paid {amount}?",
        "Who was the payee of the {amount} payment on {date}?",
    ),
    "balance": (
        "What was the balance of {account} on {date}?",
        "What balance does the ledger assert for {account} on {date}?",
        "On {date}, what was the balance of {account} at the start of the day?",
    ),
    "monthly_total": (
        "How much did I spend on {category} in {month}?",
        "What was the total booked to {category} in {month}?",
        "In {month}, what did my {category_word} expenses add up to?",
        "What were my total {category_word} expenses for {month}?",
    ),
}


def ordinal_suffix(number: int) -> str:
    """`st`, `nd`, `rd` or `th` for an English ordinal (11th, 12th, 13th, 21st, 22nd ...)."""
    if 10 <= number % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")


def format_date(day: datetime.date, style: str) -> str:
    """A date in one of `DATE_STYLES`, e.g. 2023-03-14 -> `the 14th of March 2023`."""
    month = MONTH_NAMES[day.month - 1]
    forms = {
        "iso": day.isoformat(),
        "long": f"{month} {day.day}, {day.year}",
        "short": f"{day.day} {month[:3]} {day.year}",
        "us": f"{day.month}/{day.day}/{day.year}",
        "ordinal": f"the {day.day}{ordinal_suffix(day.day)} of {month} {day.year}",
    }
    return forms[style]


def format_month(year: int, month: int, style: str) -> str:
    """A calendar month in one of `DATE_STYLES`, e.g. (2023, 3) -> `March 2023`."""
    name = MONTH_NAMES[month - 1]
    forms = {
        "iso": f"{year:04d}-{month:02d}",
        "long": f"{name} {year}",
        "short": f"{name[:3]} {year}",
        "us": f"{month}/{year}",
        "ordinal": f"the {month}{ordinal_suffix(month)} month of {year}",
    }
    return forms[style]


def _plain_number(number: Decimal) -> str:
    """`45.60` -> `45.6`, `2400.00` -> `2400`, `-3.50` -> `-3.5` (no exponent)."""
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _dollars(number: Decimal, grouped: bool) -> str:
    """`$45.60`, `-$1,234.50` (grouped) or `-$1234.50`."""
    magnitude = abs(number)
    digits = f"{magnitude:,f}" if grouped else format(magnitude, "f")
    return f"{'-' if number < 0 else ''}${digits}"


def format_amount(number: Decimal, currency: str, style: str) -> str:
    """An amount in one of `AMOUNT_STYLES`; non-USD amounts always read `12 IRAUSD`."""
    if currency != OPERATING_CURRENCY or style == "currency":
        return f"{format(number, 'f')} {currency}"
    if style == "dollar_sign":
        return _dollars(number, grouped=abs(number) >= 1000)
    if style == "words":
        return f"{_plain_number(number)} dollars"
    raise ValueError(f"unknown amount style {style!r}; expected one of {AMOUNT_STYLES}")


def format_payee(payee: str, style: str) -> str:
    """The payee as written in the ledger or lower-cased."""
    return payee if style == "ledger" else payee.lower()


def answer_forms_amount(number: Decimal, currency: str) -> list[str]:
    """Acceptable answers for an amount: ledger form first (`45.60 USD`), then `45.60`,
    `$45.60`, `45.6 dollars` (plus `$2,400.00` / `2,400.00` from 1000 up); non-USD
    amounts: `12.000 IRAUSD`, `12.000`."""
    plain = format(number, "f")
    forms = [f"{plain} {currency}", plain]
    if currency == OPERATING_CURRENCY:
        forms += [_dollars(number, grouped=False), f"{_plain_number(number)} dollars"]
        if abs(number) >= 1000:
            forms += [_dollars(number, grouped=True), f"{number:,f}"]
    return list(dict.fromkeys(forms))


def answer_forms_account(account: str) -> list[str]:
    """`Expenses:Food:Restaurant` and, without its root, `Food:Restaurant`."""
    forms = [account]
    if account.count(":") >= 2:
        forms.append(account.split(":", 1)[1])
    return forms


def category_word(category: str) -> str:
    """`Expenses:Food` -> `food`, `Expenses:Home` -> `home` (the leaf, lower-cased)."""
    return category.rsplit(":", 1)[-1].replace("-", " ").lower()


def phrase_question(kind: str, rng: random.Random, *, day: datetime.date | None = None,
                    month: tuple[int, int] | None = None, payee: str | None = None,
                    amount: tuple[Decimal, str] | None = None, account: str | None = None,
                    category: str | None = None) -> tuple[str, dict]:
    """Writes one question of `kind` with randomly chosen surface forms.

    Args:
      kind: a key of `TEMPLATES`.
      rng: the seeded generator; the draws are, in order: template, date style, amount
        style (if `amount`), payee style (if `payee`), so the mix is a function of the seed.
      day / month: the date, or (year, month) for monthly questions.
      payee, amount (number, currency), account, category: what the template mentions.

    Returns:
      (question, phrasing) where phrasing is `{"date", "amount", "payee", "template"}`:
      the style names used (`none` for an element the question does not mention) and the
      template's index in `TEMPLATES[kind]`.
    """
    templates = TEMPLATES[kind]
    template_index = rng.randrange(len(templates))
    date_style = rng.choice(DATE_STYLES)
    amount_style = rng.choice(AMOUNT_STYLES) if amount is not None else NOT_MENTIONED
    payee_style = rng.choice(PAYEE_STYLES) if payee is not None else NOT_MENTIONED
    fields = {
        "date": format_date(day, date_style) if day is not None else "",
        "month": format_month(*month, date_style) if month is not None else "",
        "payee": format_payee(payee, payee_style) if payee is not None else "",
        "amount": format_amount(*amount, amount_style) if amount is not None else "",
        "account": account or "",
        "category": category or "",
        "category_word": category_word(category) if category else "",
    }
    question = templates[template_index].format(**fields)
    phrasing = {"date": date_style, "amount": amount_style, "payee": payee_style,
                "template": template_index}
    return question, phrasing
