"""The LongBench metrics against values worked out by hand from the official definitions.

Where a value looks odd (a class match counted twice, a summary scored 0), the
comment says which quirk of the official metrics.py / eval.py produces it.
"""

import pytest

from kvbench.errors import KvbenchError
from kvbench.tasks.metrics import (
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    score_prediction,
    scorer_settings,
    using_code_sim_matcher,
)

TREC_CLASSES = ["Description of something", "Description of a person", "Individual", "Date", "Manner of an action"]


# --- qa_f1 -----------------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The Eiffel-Tower, in  an  old Paris!") == "eiffeltower in old paris"


def test_qa_f1_is_token_f1_of_normalised_answers():
    # "cat sat" against "cat sat on mat": 2 common tokens, precision 2/2, recall 2/4 -> 2/3
    assert qa_f1_score("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert qa_f1_score("An apple!", "apple") == 1.0


def test_qa_f1_counts_repeated_tokens_once_per_occurrence():
    # prediction "yes yes", answer "yes": overlap 1, precision 1/2, recall 1 -> 2/3
    assert qa_f1_score("yes yes", "yes") == pytest.approx(2 / 3)


def test_qa_f1_of_empty_or_article_only_prediction_is_zero():
    assert qa_f1_score("", "Paris") == 0.0
    assert qa_f1_score("the", "the") == 0.0  # both normalise to no tokens at all


def test_qa_f1_zh_uses_jieba_words_without_punctuation():
    # 北京/是/中国/的/首都 (。 dropped) against 中国/的/首都: overlap 3, precision 3/5, recall 1 -> 0.75
    assert qa_f1_zh_score("北京是中国的首都。", "中国的首都") == pytest.approx(0.75)
    assert qa_f1_zh_score("首都是北京", "北京是首都") == 1.0  # word order does not matter
    assert qa_f1_zh_score("", "北京") == 0.0


def test_normalize_zh_answer_keeps_the_official_punctuation_list():
    # "》" is in the official list, "《" is not
    assert normalize_zh_answer("《红楼梦》， Dream") == "《红楼梦dream"


# --- rouge -----------------------------------------------------------------------------------


def test_rouge_l_counts_distinct_words():
    # one sentence each; LCS "the cat on the mat" holds 4 distinct words, and each side has
    # 5 distinct words, so R = P = 4/5 and F = 2PR / (P + R + 1e-8)
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)


def test_rouge_l_is_summary_level_over_sentences_split_at_periods():
    # hypothesis sentences "the cat sat", "the dog ran"; the union of their LCS with the
    # reference "the cat ran" is {the, cat, ran}: R = 3/3, P = 3/5 -> F = 0.75
    assert rouge_score("the cat sat. the dog ran.", "the cat ran") == pytest.approx(0.75, abs=1e-7)


def test_rouge_of_empty_prediction_is_zero():
    # rouge raises ValueError for an empty hypothesis; the official scorer returns 0
    assert rouge_score("", "a summary") == 0.0
    assert rouge_score("...", "a summary") == 0.0  # only periods: no sentence left


def test_rouge_zh_scores_jieba_words():
    # 会议/讨论/了/教育/问题/。 is one sentence ("。" is not "."): 6 words, LCS 教育 问题 -> R 1, P 1/3, F 0.5
    assert rouge_zh_score("会议讨论了教育问题。", "教育问题") == pytest.approx(0.5, abs=1e-7)


def _one_sentence(word_count: int) -> str:
    return " ".join(f"w{index}" for index in range(word_count))


def _at_depth(depth: int, function, *args):
    """Call function(*args) with `depth` more frames on the stack."""
    if depth == 0:
        return function(*args)
    return _at_depth(depth - 1, function, *args)


@pytest.mark.parametrize("extra_depth", [0, 200])
def test_rouge_overflows_exactly_where_official_eval_does_whatever_the_callers_depth(extra_depth):
    # rouge rebuilds the LCS recursively, one call per word here. Run as `python eval.py`,
    # the official scorer gives 100 to an identical 990-word sentence and 0 to a 991-word one
    # (RecursionError caught by its bare except); checked against LongBench's eval.py.
    assert _at_depth(extra_depth, rouge_score, _one_sentence(990), _one_sentence(990)) == pytest.approx(1.0, abs=1e-7)
    assert _at_depth(extra_depth, rouge_score, _one_sentence(991), _one_sentence(991)) == 0.0
    # rouge_zh_score calls rouge_score in the official code, one frame deeper: 989 fits, 990 does not
    assert _at_depth(extra_depth, rouge_zh_score, _one_sentence(989), _one_sentence(989)) == pytest.approx(1.0, abs=1e-7)
    assert _at_depth(extra_depth, rouge_zh_score, _one_sentence(990), _one_sentence(990)) == 0.0


# --- classification --------------------------------------------------------------------------


def test_classification_finds_the_gold_class_name_in_the_prediction():
    assert classification_score("Type: Description of a person", "Description of a person", TREC_CLASSES) == 1.0
    assert classification_score("Date", "Description of a person", TREC_CLASSES) == 0.0


def test_classification_splits_credit_between_all_class_names_mentioned():
    assert classification_score("Individual or Date", "Individual", TREC_CLASSES) == 0.5


def test_classification_ignores_class_names_inside_the_gold_class():
    # "Human" is part of the gold class "Human being", so only "Human being" counts
    assert classification_score("Human being", "Human being", ["Human", "Human being", "Date"]) == 1.0


def test_classification_keeps_the_official_skip_after_a_removal():
    # Official code removes "A" from the list it iterates over, so "AB" (also part of the
    # gold "ABC") is skipped and stays: two matches, score 1/2 rather than 1.
    assert classification_score("ABC", "ABC", ["A", "AB", "ABC"]) == 0.5


def test_classification_of_chinese_classes_and_empty_prediction():
    classes = ["体育", "军事", "教育"]
    assert classification_score("这是一条体育新闻", "体育", classes) == 1.0
    assert classification_score("", "体育", classes) == 0.0


# --- retrieval and count ---------------------------------------------------------------------


def test_retrieval_is_the_share_of_numbers_naming_the_gold_paragraph():
    assert retrieval_score("Paragraph 19", "Paragraph 19") == 1.0
    assert retrieval_score("Paragraph 19, or maybe Paragraph 3", "Paragraph 19") == 0.5
    assert retrieval_score("Paragraph 1", "Paragraph 19") == 0.0
    assert retrieval_score("I do not know", "Paragraph 19") == 0.0
    assert retrieval_score("", "Paragraph 19") == 0.0


def test_retrieval_zh_reads_the_paragraph_number_after_duan_luo():
    assert retrieval_zh_score("段落5", "段落5") == 1.0
    assert retrieval_zh_score("第5段，不是段落15", "段落5") == 0.5


def test_retrieval_needs_a_paragraph_in_the_gold_answer():
    with pytest.raises(KvbenchError, match="names no paragraph"):
        retrieval_score("Paragraph 1", "the first one")


def test_count_is_the_share_of_numbers_equal_to_the_count():
    assert count_score("46", "46") == 1.0
    assert count_score("There are 46 unique paragraphs out of 50", "46") == 0.5
    assert count_score("046", "46") == 0.0  # digit strings are compared, not values
    assert count_score("none", "46") == 0.0


# --- code ------------------------------------------------------------------------------------


def test_code_sim_is_the_fuzz_ratio_in_hundredths():
    # difflib ratio 2*3/8 = 0.75; "return x" in "    return x": 2*8/20 = 0.8
    assert code_sim_score("abcd", "abce") == 0.75
    assert code_sim_score("return x", "    return x") == 0.8


def test_code_sim_scores_the_first_line_without_comment_or_fence_marks():
    prediction = "\n# the next line\n// also a comment\n```python\n    return x\nprint(y)\n"
    assert code_sim_score(prediction, "    return x") == 1.0


def test_code_sim_skips_any_line_with_a_comment_mark_even_inside_code():
    # 'url = "http://x"' holds "//", so the next line is the one compared
    assert code_sim_score('url = "http://x"\nreturn url', "return url") == 1.0


def test_code_sim_of_no_code_line_or_empty_prediction_is_zero():
    assert code_sim_score("# only a comment", "x = 1") == 0.0
    assert code_sim_score("", "x = 1") == 0.0


# --- score_prediction: eval.py around the metrics --------------------------------------------


def test_score_prediction_takes_the_best_answer():
    assert score_prediction("triviaqa", "fifty-five", ["55", "fifty-five"], None) == 1.0
    # 2 common tokens with the second answer: precision 2/2, recall 2/3
    assert score_prediction("hotpotqa", "Barack Obama", ["Michelle", "Barack Hussein Obama"], None) == pytest.approx(0.8)


def test_score_prediction_cuts_few_shot_predictions_to_their_first_line():
    prediction = "\n\nParis\nExplanation: the capital of France"
    assert score_prediction("triviaqa", prediction, ["Paris"], None) == 1.0
    # hotpotqa keeps it whole: "paris explanation capital of france", precision 1/5, recall 1
    assert score_prediction("hotpotqa", prediction, ["Paris"], None) == pytest.approx(1 / 3)


def test_score_prediction_first_line_of_trec_decides_the_class():
    assert score_prediction("trec", "Individual\nDate", ["Individual"], TREC_CLASSES) == 1.0
    assert score_prediction("trec_e", "Date\nIndividual", ["Individual"], TREC_CLASSES) == 0.0


def test_score_prediction_of_empty_prediction_is_zero_for_every_metric():
    cases = {
        "narrativeqa": ["a boat"],
        "multifieldqa_zh": ["北京"],
        "gov_report": ["A summary."],
        "vcsum": ["会议总结"],
        "trec": ["Date"],
        "passage_count": ["3"],
        "passage_retrieval_en": ["Paragraph 3"],
        "passage_retrieval_zh": ["段落3"],
        "lcc": ["x = 1"],
    }
    for task, answers in cases.items():
        assert score_prediction(task, "", answers, TREC_CLASSES) == 0.0, task


def test_score_prediction_needs_class_names_for_classification():
    with pytest.raises(KvbenchError, match="all_classes"):
        score_prediction("lsht", "体育", ["体育"], None)


def test_score_prediction_refuses_a_task_that_is_not_longbench():
    with pytest.raises(KvbenchError, match="unknown LongBench task 'needle'"):
        score_prediction("needle", "x", ["x"], None)


def test_code_sim_matcher_is_explicit_and_defaults_to_python_levenshtein():
    # A pair on which python-Levenshtein's ratio (what KVCache-Factory's published numbers used) and
    # difflib's pure-Python SequenceMatcher disagree: 26 against 21.
    prediction, gold = ".beb)))=(", "db)a((.a)ed.b aaa=,a(=d(a,d)),"
    assert code_sim_score(prediction, gold) == 0.26
    assert scorer_settings() == {"code_sim_matcher": "levenshtein"}
    with using_code_sim_matcher("difflib"):
        assert code_sim_score(prediction, gold) == 0.21
        assert scorer_settings() == {"code_sim_matcher": "difflib"}
    assert code_sim_score(prediction, gold) == 0.26
    # fuzzywuzzy's wrappers: equal strings 100, an empty side 0
    assert fuzz_ratio("same", "same", "difflib") == fuzz_ratio("same", "same", "levenshtein") == 100
    assert fuzz_ratio("", "x", "levenshtein") == 0
    with pytest.raises(KvbenchError, match="--code-sim-matcher must be one of"):
        with using_code_sim_matcher("jaro"):
            pass
