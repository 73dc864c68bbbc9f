"""Evaluation: multiple-choice accuracy (ScienceQA layout, the synthetic shapes eval set)."""

from .multiple_choice import evaluate_multiple_choice, load_records, parse_letter

__all__ = ["evaluate_multiple_choice", "load_records", "parse_letter"]
