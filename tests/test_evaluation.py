"""SQuAD-normalised answer metrics and retrieval recall."""
import numpy as np

from atlas_jax import evaluation


def test_normalisation_em_f1():
    assert evaluation.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert evaluation.exact_match("the Paris.", ["Paris", "Lyon"]) == 1.0
    assert evaluation.exact_match("Paris France", ["Paris"]) == 0.0
    assert abs(evaluation.f1("Paris France", ["Paris"]) - 2 / 3) < 1e-9
    assert evaluation.f1("", ["Paris"]) == 0.0


def test_recall_and_answer_recall():
    retrieved = np.array([[3, 1, -1], [5, 6, 7]])
    assert evaluation.recall_at_k(retrieved, [[1], [9]], k=2) == 0.5
    assert evaluation.recall_at_k(retrieved, [[1], [7]], k=3) == 1.0
    assert evaluation.recall_at_k(retrieved, [[1], [7]], k=1) == 0.0
    texts = [["Paid 42.50 USD to Whole Foods", "rent"], ["nothing here", "The answer: Paris."]]
    assert evaluation.answer_recall_at_k(texts, [["whole foods"], ["paris"]], k=2) == 1.0
    assert evaluation.answer_recall_at_k(texts, [["whole foods"], ["paris"]], k=1) == 0.5
    assert not evaluation.has_answer("parisian", ["paris"])


def test_neighbour_recall():
    assert evaluation.neighbour_recall(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), 3) == 2 / 3
