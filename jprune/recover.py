"""Recovery after pruning: knowledge distillation loss (and, for LLMs, layer-wise reconstruction in llm.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def distillation_loss(student_logits, teacher_logits, labels, *, temperature: float = 4.0, alpha: float = 0.5):
  """alpha · CE(student, labels) + (1 − alpha) · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton 2015).

  Examples:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[2.0, 0.0]]); y = jnp.array([0])
    >>> float(distillation_loss(s, s, y, alpha=0.0))
    0.0
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
  t = jnp.float32(temperature)
  p_teacher = jax.nn.softmax(teacher_logits / t, axis=-1)
  log_p_student = jax.nn.log_softmax(student_logits / t, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits / t, axis=-1)
  kl = jnp.sum(p_teacher * (log_p_teacher - log_p_student), axis=-1).mean()
  return alpha * ce + (1.0 - alpha) * t * t * kl
