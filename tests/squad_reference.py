"""SQuAD v1.1 answer normalisation written out for the tests, independently of
`atlas_jax.evaluation`: lower case, no punctuation, no articles, single spaces."""
import re
import string


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, answers) -> bool:
    return normalize(prediction) in {normalize(a) for a in answers}
