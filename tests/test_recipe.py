import pytest

from kdcontract.errors import UserError
from training.recipe import load_recipe, parse_overrides


def test_bundled_recipes_load_with_their_documented_settings():
    digits = load_recipe("digits")
    assert digits.teacher.arch == "resnet50" and digits.student.arch == "resnet18"
    assert digits.data.dataset == "digits" and digits.data.augment.hflip is False
    cifar = load_recipe("cifar10")
    assert cifar.data.image_size == 32 and cifar.student.train.epochs == 200


def test_overrides_are_parsed_as_yaml_scalars_and_applied():
    recipe = load_recipe("digits", ["student.train.epochs=3", "distill.loss=dkd", "evaluation.seeds=[4, 5]"])
    assert recipe.student.train.epochs == 3
    assert recipe.distill.loss == "dkd"
    assert recipe.evaluation.seeds == [4, 5]
    assert parse_overrides(["a.b=true"]) == [("a.b", True)]


def test_unknown_keys_are_named_in_the_error(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: x\nteacher: {arch: resnet50, epoch: 3}\nstudent: {arch: resnet18}\nsed: 1\n")
    with pytest.raises(UserError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert "unknown key 'teacher.epoch'" in message and "unknown key 'sed'" in message
    assert "\n" not in message


def test_bad_values_and_unknown_recipe_names_give_actionable_errors(tmp_path):
    with pytest.raises(UserError, match=r"student\.train\.epochs"):
        load_recipe("digits", ["student.train.epochs=0"])
    with pytest.raises(UserError, match="known recipes: cifar10, digits"):
        load_recipe("no-such-recipe")
    with pytest.raises(UserError, match="must look like"):
        load_recipe("digits", ["student.train.epochs"])


def test_recipes_are_data_not_code(tmp_path):
    # safe_load refuses Python object tags instead of executing them.
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(path))
