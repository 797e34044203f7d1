"""scikit-learn's estimator checks on MOMAMerger: the applicable ones run as they are, the rest are in one table.

``check_estimator``/``parametrize_with_checks`` skip an estimator whose tags say X is not a 2-D array,
so the check functions are called one by one here. Every check function that
``sklearn.utils.estimator_checks`` defines is either in ``APPLICABLE`` (run on a toy merger) or in
``NOT_APPLICABLE`` with the reason; ``test_every_sklearn_check_is_run_or_explained`` fails when a
scikit-learn release adds a check, so it gets looked at. Where a check exercises an API rule with
2-D array data, the rule is tested below on ``TaskSamples`` in the test the reason names.
"""

import inspect
import pickle
import re
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks
from sklearn.utils.validation import check_is_fitted

from momaestimator import MOMAMerger, TaskSamples, toy

APPLICABLE = [
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order",
]

_X2D = "feeds a 2-D numeric array as X; MOMAMerger's X is a TaskSamples or {task: data} (two_d_array=False)"
_SW = "fit takes no sample_weight (fitting is unsupervised: a few unlabeled samples per task)"
_NOT_CLF = "MOMAMerger is not a classifier: it returns a merged model and scores it; it has no predict"
_NOT_REG = "MOMAMerger is not a regressor"
_NOT_CLU = "MOMAMerger is not a clusterer"
_NOT_OUT = "MOMAMerger is not an outlier detector"
_NOT_TRF = "transform() returns a torch module, not an array: MOMAMerger is deliberately not a TransformerMixin"
_ARRAY_API = "array API dispatch does not apply: X holds per-task torch inputs, not arrays of one namespace"

NOT_APPLICABLE = {
    # drivers and helpers, not checks
    "check_estimator": "the driver: it skips the whole estimator because two_d_array=False; this module runs "
    "the checks one by one instead",
    "check_outlier_corruption": "a helper of the outlier checks, not an estimator check",
    # the API rules scikit-learn tests with 2-D data: tested here on TaskSamples
    "check_fit_score_takes_y": f"{_X2D}; equivalent: test_fit_and_score_take_y",
    "check_requires_y_none": f"{_X2D}; equivalent: test_fit_needs_no_y",
    "check_estimators_fit_returns_self": f"{_X2D}; equivalent: test_fit_returns_self",
    "check_estimators_overwrite_params": f"{_X2D}; equivalent: test_fit_leaves_parameters_alone",
    "check_dont_overwrite_parameters": f"{_X2D}; equivalent: test_fit_leaves_parameters_alone",
    "check_dict_unchanged": f"{_X2D}; equivalent: test_transform_and_score_leave_state_alone",
    "check_fit_idempotent": f"{_X2D}; equivalent: test_fit_is_idempotent",
    "check_fit_check_is_fitted": f"{_X2D}; equivalent: test_check_is_fitted",
    "check_estimators_unfitted": "only calls predict/decision_function/predict_proba, which MOMAMerger lacks; "
    "equivalent: test_unfitted_methods_raise_not_fitted",
    "check_estimators_pickle": f"{_X2D}; equivalent: test_pickle_round_trip",
    "check_readonly_memmap_input": f"{_X2D}; equivalent: test_fit_on_read_only_memmap",
    "check_estimators_nan_inf": f"{_X2D}; equivalent: test_nan_and_inf_inputs_are_refused",
    "check_estimators_empty_data_messages": f"{_X2D}; equivalent: test_empty_data_is_refused",
    "check_methods_subset_invariance": f"{_X2D}; equivalent: test_scores_are_subset_invariant",
    "check_methods_sample_order_invariance": f"{_X2D}; equivalent: test_scores_are_subset_invariant",
    # 2-D array specifics (dtypes, sparse, 1-D/1-feature shapes, feature names, pandas)
    "check_estimators_dtypes": _X2D,
    "check_dtype_object": _X2D,
    "check_complex_data": _X2D,
    "check_f_contiguous_array_estimator": _X2D,
    "check_inplace_ensure_writeable": _X2D,
    "check_fit1d": _X2D,
    "check_fit2d_1feature": _X2D,
    "check_fit2d_1sample": _X2D,
    "check_fit2d_predict1d": _X2D,
    "check_fit_non_negative": _X2D,
    "check_positive_only_tag_during_fit": _X2D,
    "check_estimator_sparse_array": f"{_X2D}; sparse inputs do not exist for images",
    "check_estimator_sparse_matrix": f"{_X2D}; sparse inputs do not exist for images",
    "check_estimator_sparse_tag": f"{_X2D}; sparse inputs do not exist for images",
    "check_n_features_in": f"{_X2D}; there is no n_features_in_ (inputs are images; feature_dim_ is the encoder's "
    "output size)",
    "check_n_features_in_after_fitting": f"{_X2D}; returns at once for two_d_array=False",
    "check_dataframe_column_names_consistency": f"{_X2D}; returns at once for two_d_array=False",
    "check_estimators_data_not_an_array": _X2D,
    "check_pipeline_consistency": f"{_X2D}; a merger is the last step of nothing: transform returns a module",
    "check_supervised_y_2d": f"{_X2D}; y is ignored by fit",
    "check_supervised_y_no_nan": "y is ignored by fit (labels never leak into fitting), so a NaN y is not an error",
    "check_non_transformer_estimators_n_iter": "applies to estimators with a max_iter parameter; MOMAMerger has "
    "n_steps (n_iter_ is tested in test_fit_returns_self)",
    "check_transformer_n_iter": "applies to estimators with a max_iter parameter; MOMAMerger has n_steps",
    "check_param_validation": "needs scikit-learn's private _parameter_constraints; parameter validation is tested "
    "in tests/test_validation.py::test_out_of_range_parameters",
    "check_estimators_partial_fit_n_features": "MOMAMerger has no partial_fit",
    "check_decision_proba_consistency": "MOMAMerger has no decision_function or predict_proba",
    "check_sparsify_coefficients": "MOMAMerger has no sparsify (its sparsity is the mask's, a parameter)",
    "check_nonsquare_error": "MOMAMerger is not a pairwise estimator",
    # sample weights
    "check_all_zero_sample_weights_error": _SW,
    "check_sample_weight_equivalence_on_dense_data": _SW,
    "check_sample_weight_equivalence_on_sparse_data": _SW,
    "check_sample_weights_list": _SW,
    "check_sample_weights_not_an_array": _SW,
    "check_sample_weights_not_overwritten": _SW,
    "check_sample_weights_pandas_series": _SW,
    "check_sample_weights_shape": _SW,
    # array API
    "check_array_api_input": _ARRAY_API,
    "check_array_api_input_and_values": _ARRAY_API,
    "check_array_api_mixed_inputs": _ARRAY_API,
    "check_array_api_same_namespace": _ARRAY_API,
    # estimator kinds MOMAMerger is not
    "check_class_weight_balanced_classifiers": _NOT_CLF,
    "check_class_weight_balanced_linear_classifier": _NOT_CLF,
    "check_class_weight_classifiers": _NOT_CLF,
    "check_classifier_data_not_an_array": _NOT_CLF,
    "check_classifier_multioutput": _NOT_CLF,
    "check_classifier_not_supporting_multiclass": _NOT_CLF,
    "check_classifiers_classes": _NOT_CLF,
    "check_classifiers_multilabel_output_format_decision_function": _NOT_CLF,
    "check_classifiers_multilabel_output_format_predict": _NOT_CLF,
    "check_classifiers_multilabel_output_format_predict_proba": _NOT_CLF,
    "check_classifiers_multilabel_representation_invariance": _NOT_CLF,
    "check_classifiers_one_label": _NOT_CLF,
    "check_classifiers_one_label_sample_weights": _NOT_CLF,
    "check_classifiers_predictions": _NOT_CLF,
    "check_classifiers_regression_target": _NOT_CLF,
    "check_classifiers_train": _NOT_CLF,
    "check_regressor_data_not_an_array": _NOT_REG,
    "check_regressor_multioutput": _NOT_REG,
    "check_regressors_int": _NOT_REG,
    "check_regressors_no_decision_function": _NOT_REG,
    "check_regressors_train": _NOT_REG,
    "check_clusterer_compute_labels_predict": _NOT_CLU,
    "check_clustering": _NOT_CLU,
    "check_outlier_contamination": _NOT_OUT,
    "check_outliers_fit_predict": _NOT_OUT,
    "check_outliers_train": _NOT_OUT,
    "check_global_output_transform_pandas": _NOT_TRF,
    "check_global_set_output_transform_polars": _NOT_TRF,
    "check_set_output_transform": _NOT_TRF,
    "check_set_output_transform_pandas": _NOT_TRF,
    "check_set_output_transform_polars": _NOT_TRF,
    "check_transformer_data_not_an_array": _NOT_TRF,
    "check_transformer_general": _NOT_TRF,
    "check_transformer_get_feature_names_out": _NOT_TRF,
    "check_transformer_get_feature_names_out_pandas": _NOT_TRF,
    "check_transformer_preserve_dtypes": _NOT_TRF,
    "check_transformers_unfitted": f"{_NOT_TRF}; equivalent: test_unfitted_methods_raise_not_fitted",
    "check_transformers_unfitted_stateless": _NOT_TRF,
    "check_get_feature_names_out_error": f"{_NOT_TRF}; there are no output feature names",
}


def sklearn_check_names():
    return sorted(
        name
        for name, func in inspect.getmembers(estimator_checks, inspect.isfunction)
        if name.startswith("check_") and func.__module__ == estimator_checks.__name__
    )


@pytest.fixture(scope="module")
def toy_problem():
    pre, experts, heads, data = toy.make_problem(n_tasks=2, random_state=0)
    X = TaskSamples.from_arrays({t: x for t, (x, _) in data.items()}, {t: y for t, (_, y) in data.items()})
    return pre, experts, heads, X


@pytest.fixture()
def merger(toy_problem):
    pre, experts, heads, _ = toy_problem
    return MOMAMerger(pre, experts, heads, n_steps=3, batch_size=8, random_state=0)


# ---------------------------------------------------------------------------------- bookkeeping
def test_every_sklearn_check_is_run_or_explained():
    names = set(sklearn_check_names())
    unexplained = sorted(names - set(APPLICABLE) - set(NOT_APPLICABLE))
    assert not unexplained, f"new scikit-learn checks: run them or add them to NOT_APPLICABLE: {unexplained}"
    assert not set(APPLICABLE) & set(NOT_APPLICABLE)
    gone = sorted((set(APPLICABLE) | set(NOT_APPLICABLE)) - names)
    assert not gone, f"checks that scikit-learn no longer defines: {gone}"
    assert all(reason.strip() for reason in NOT_APPLICABLE.values())


def test_every_named_equivalent_exists():
    named = {m for reason in NOT_APPLICABLE.values() for m in re.findall(r"equivalent: (test_\w+)", reason)}
    assert named and all(callable(globals().get(name)) for name in named), named - set(globals())


# ---------------------------------------------------------------------------------- sklearn's own checks
@pytest.mark.parametrize("check_name", APPLICABLE)
def test_sklearn_check(check_name, merger):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "does not inherit from BaseEstimator"
        getattr(estimator_checks, check_name)(type(merger).__name__, merger)


def test_tags_are_honest(merger):
    from sklearn.utils import get_tags

    tags = get_tags(merger)
    assert tags.input_tags.two_d_array is False and tags.target_tags.required is False
    assert tags.requires_fit is True and tags.non_deterministic is False


# ---------------------------------------------------------------------------------- the same rules on TaskSamples
def fitted_state(m):
    return (
        {k: v.clone() for k, v in m.mask_.items()},
        {t: q.clone() for t, q in m.rotations_.items()},
    )


def same_state(a, b):
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and all(torch.equal(a[1][t], b[1][t]) for t in a[1])


def plain_params(m):
    """``get_params`` with the (shared, read-only) modules replaced by their identity."""
    return {
        k: (id(v) if k in ("pretrained_encoder", "finetuned_encoders", "heads") else v)
        for k, v in m.get_params(deep=False).items()
    }


def test_fit_returns_self(merger, toy_problem):
    X = toy_problem[3]
    assert merger.fit(X) is merger
    assert merger.fit(X, X.targets()) is merger
    assert merger.n_iter_ == 3 and merger.tasks_ == ["task0", "task1"]


def test_fit_and_score_take_y(merger, toy_problem):
    for method in ("fit", "score", "score_per_task"):
        assert list(inspect.signature(getattr(merger, method)).parameters)[:2] == ["X", "y"]
    X = toy_problem[3]
    merger.fit(X, X.targets())
    assert merger.score(X, X.targets()) == merger.score(X)


def test_fit_needs_no_y(merger, toy_problem):
    X = toy_problem[3]
    unlabeled = TaskSamples.from_arrays({t: X.task_inputs(t, idx) for t, idx in X.indices_by_task().items()})
    with pytest.raises(ValueError, match="has no labels"):
        unlabeled.targets()
    merger.fit(unlabeled)  # no labels anywhere
    check_is_fitted(merger)


def test_fit_leaves_parameters_alone(merger, toy_problem):
    before = plain_params(merger)
    hashed = joblib.hash(
        {
            k: v
            for k, v in merger.get_params(deep=False).items()
            if not isinstance(v, (dict,)) and not isinstance(v, torch.nn.Module)
        }
    )
    public_before = {k for k in vars(merger) if not k.startswith("_")}
    merger.fit(toy_problem[3])
    assert plain_params(merger) == before
    assert (
        joblib.hash(
            {
                k: v
                for k, v in merger.get_params(deep=False).items()
                if not isinstance(v, (dict,)) and not isinstance(v, torch.nn.Module)
            }
        )
        == hashed
    )
    added = {k for k in vars(merger) if not k.startswith("_")} - public_before
    assert added and all(k.endswith("_") for k in added), added


def test_transform_and_score_leave_state_alone(merger, toy_problem):
    X = toy_problem[3]
    merger.fit(X)
    state, keys = fitted_state(merger), set(vars(merger))
    merger.transform()
    merger.score(X)
    merger.score_per_task(X)
    assert same_state(state, fitted_state(merger)) and set(vars(merger)) == keys


def test_fit_is_idempotent(merger, toy_problem):
    X = toy_problem[3]
    first = fitted_state(merger.fit(X))
    score = merger.score(X)
    assert same_state(first, fitted_state(merger.fit(X))) and merger.score(X) == score


def test_check_is_fitted(merger, toy_problem):
    with pytest.raises(NotFittedError):
        check_is_fitted(merger)
    check_is_fitted(merger.fit(toy_problem[3]))


def test_unfitted_methods_raise_not_fitted(merger, toy_problem):
    X = toy_problem[3]
    for call in (merger.transform, merger.merged_state_dict, lambda: merger.score(X), lambda: merger.score_per_task(X)):
        with pytest.raises(NotFittedError):
            call()


def test_pickle_round_trip(merger, toy_problem):
    X = toy_problem[3]
    merger.fit(X)
    again = pickle.loads(pickle.dumps(merger))
    assert same_state(fitted_state(merger), fitted_state(again)) and again.score(X) == merger.score(X)
    a, b = merger.transform().state_dict(), again.transform().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_on_read_only_memmap(merger, toy_problem, tmp_path):
    X = toy_problem[3]
    arrays = {t: X.task_inputs(t, idx).numpy() for t, idx in X.indices_by_task().items()}
    joblib.dump(arrays, tmp_path / "x.joblib")
    mapped = joblib.load(tmp_path / "x.joblib", mmap_mode="r")
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in mapped.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "The given NumPy array is not writable"
        from_memmap = MOMAMerger(**merger.get_params()).fit(TaskSamples.from_arrays(mapped))
    assert same_state(fitted_state(from_memmap), fitted_state(merger.fit(X)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_inputs_are_refused(merger, toy_problem, bad):
    X = toy_problem[3]
    arrays = {t: X.task_inputs(t, idx).clone() for t, idx in X.indices_by_task().items()}
    arrays["task1"][3, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"X\['task1'\] contains NaN or infinite"):
        merger.fit(TaskSamples.from_arrays(arrays))


def test_empty_data_is_refused(merger, toy_problem):
    X = toy_problem[3]
    with pytest.raises(ValueError, match=r"X is an empty TaskSamples"):
        merger.fit(X[[]])
    with pytest.raises(ValueError, match=r"missing: \['task1'\]"):
        merger.fit(X[X.task_ids == 0])


def test_scores_are_subset_invariant(merger, toy_problem):
    X = toy_problem[3]
    merger.fit(X)
    whole = merger.score_per_task(X)
    rng = np.random.RandomState(0)
    shuffled = X[rng.permutation(len(X))]
    assert merger.score_per_task(shuffled) == pytest.approx(whole)
    for task, pos in X.positions_by_task().items():  # a task's accuracy does not depend on the other tasks
        assert merger.score_per_task(X[pos]) == pytest.approx({task: whole[task]})


def test_repr_and_notebook_display_summarise_the_models():
    from momaestimator import toy
    from momaestimator.baselines import AdaMerging

    pre, experts, heads, _ = toy.make_problem(n_tasks=2)
    for est in (MOMAMerger(pre, experts, heads, sparsity=0.2), AdaMerging(pre, experts, heads)):
        text, html = repr(est), est._repr_mimebundle_()["text/html"]
        assert "pretrained_encoder=VisionTransformer(...)" in text and "'task1': LinearHead(...)" in text
        assert "Conv2d" not in text and "Conv2d" not in html and "VisionTransformer(...)" in html
        assert est.pretrained_encoder is pre and est.heads is heads  # the estimator is not touched


def test_repr_is_laid_out_in_columns_and_summarises_the_models_inside_a_search_or_pipeline():
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    from momaestimator import toy

    pre, experts, heads, _ = toy.make_problem(n_tasks=6)
    est = MOMAMerger(pre, experts, heads, sparsity=0.2)
    text = repr(est)
    assert max(len(line) for line in text.splitlines()) <= 80 and text.count("\n") >= 5
    for outer in (GridSearchCV(est, {"sparsity": [0.1, 0.3]}), make_pipeline(est)):
        text = repr(outer)
        assert "pretrained_encoder=VisionTransformer(...)" in text and "Conv2d" not in text
        assert "'task5': LinearHead(...)" in text and max(len(line) for line in text.splitlines()) <= 100
        assert "Conv2d" not in outer._repr_mimebundle_()["text/html"]
