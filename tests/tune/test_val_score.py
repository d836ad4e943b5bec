"""What ASHA compares: the pretraining's validation of the modality a trial is judged on, read from train.log."""

from __future__ import annotations

import math

from trainer.tune.spec import ExperimentSpec
from trainer.tune.trial import judged_modality, judged_validation, parse_validations

LOG = """21:48:07 step 200/5000  epoch 0  loss 3.0  lr 0.0005
21:48:07 validation after epoch 0 (step 65): score 0.0876 (best)  ephys: static_gratings 0.140, drifting_gratings 0.153, natural_scenes 0.006; ophys: static_gratings 0.171, drifting_gratings 0.049, natural_scenes 0.006  (pooled per query: score 0.0868)
21:49:07 validation after epoch 1 (step 130): score 0.5000  ephys: static_gratings 0.600, drifting_gratings 0.400, natural_scenes 0.500  (pooled per query: score 0.49)
"""


def test_each_validation_line_gives_its_modalities_task_mean():
    (e0, s0, score0, per0), (e1, s1, score1, per1) = parse_validations(LOG)
    assert (e0, s0, score0, e1, s1, score1) == (0, 65, 0.0876, 1, 130, 0.5)
    assert math.isclose(per0["ephys"], (0.140 + 0.153 + 0.006) / 3)
    assert math.isclose(per0["ophys"], (0.171 + 0.049 + 0.006) / 3)
    assert set(per1) == {"ephys"}


def test_a_trial_judged_on_ophys_is_compared_on_ophys_and_falls_back_to_the_score_without_it():
    (_, _, score0, per0), (_, _, score1, per1) = parse_validations(LOG)
    ophys = judged_modality(ExperimentSpec(evaluate=["ephys", "ophys"]))
    assert ophys == "ophys" and judged_modality(ExperimentSpec(evaluate=["ephys"])) == "ephys"
    assert judged_validation(score0, per0, ophys) == per0["ophys"] != score0
    assert judged_validation(score1, per1, ophys) == score1  # an EPhys-only validation: the overall score
