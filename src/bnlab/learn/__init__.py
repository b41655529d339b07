"""Learn batch norm by writing it: exercises graded against :mod:`bnlab.core` and torch.

``bnlab learn list`` lists them, ``bnlab learn start NAME`` writes a template to complete,
``bnlab learn check FILE`` grades it (:func:`check_file`). Each exercise's reference
solution ships in :mod:`bnlab.learn.solutions`.
"""

from bnlab.learn.files import solution_path, template_path, write_template
from bnlab.learn.grading import EXERCISES, Exercise, Grade, check_file, get_exercise

__all__ = [
    "EXERCISES",
    "Exercise",
    "Grade",
    "check_file",
    "get_exercise",
    "solution_path",
    "template_path",
    "write_template",
]
