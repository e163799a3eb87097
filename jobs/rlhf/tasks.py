"""Verifiable prompt sets for RL (issue 17): generated kk/ru/en arithmetic word problems, and GSM8K-style jsonl.

Every problem is a `Problem` (id, language, question, answer as a string). `arithmetic_problems` writes them
offline from templates, so CI has a task whose answers are checked by `rewards.exact_answer`:

    Айгүлде 5 алма бар. Ол тағы 7 алма алды. Айгүлде барлығы неше алма бар?       -> 12
    У Марата 12 тетрадей. Он отдал 4 тетради. Сколько тетрадей осталось у Марата?  -> 8
    Dana buys 3 boxes with 6 pencils in each. How many pencils does Dana have?     -> 18

Russian nouns agree with the number (1 яблоко, 2 яблока, 5 яблок; 11-14 take the plural genitive), Kazakh
nouns stay singular after a number, English ones take -s. `load_gsm8k` reads GSM8K's jsonl layout
(`question`, and `answer` ending with `#### <number>`), e.g. a translated GSM8K-kk a user downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LANGUAGES = ("kk", "ru", "en")


@dataclass(frozen=True)
class Problem:
    id: str
    lang: str
    question: str
    answer: str | None  # None: a prompt without a verifiable answer (instructions)


def ru_plural(n: int, one: str, few: str, many: str) -> str:
    """The Russian form of a noun after the number n: 1, 21, 101 -> one; 2-4, 22-24 -> few; 0, 5-20, 25 -> many."""
    n = abs(n)
    if n % 10 == 1 and n % 100 != 11:
        return one
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return few
    return many


# (kk, ru one/few/many, en singular/plural)
_OBJECTS = (
    ("алма", ("яблоко", "яблока", "яблок"), ("apple", "apples")),
    ("кітап", ("книга", "книги", "книг"), ("book", "books")),
    ("қарындаш", ("карандаш", "карандаша", "карандашей"), ("pencil", "pencils")),
    ("дәптер", ("тетрадь", "тетради", "тетрадей"), ("notebook", "notebooks")),
    ("қой", ("овца", "овцы", "овец"), ("sheep", "sheep")),
)
# (kk name, its locative "-да/-де/-та/-те", ru name nominative, ru genitive after "у", en name)
_PEOPLE = (
    ("Айгүл", "Айгүлде", "Айгуль", "Айгуль", "Aigul"),
    ("Марат", "Маратта", "Марат", "Марата", "Marat"),
    ("Дана", "Данада", "Дана", "Даны", "Dana"),
    ("Ерлан", "Ерланда", "Ерлан", "Ерлана", "Erlan"),
)
_INSTRUCTION = {
    "kk": "Есепті шығар. Ойыңды <think></think> ішінде жаз, соңында жауапты #### <сан> түрінде бер.",
    "ru": "Реши задачу. Рассуждай внутри <think></think>, в конце дай ответ в виде #### <число>.",
    "en": "Solve the problem. Reason inside <think></think>, then give the answer as #### <number>.",
}


def _count(lang: str, n: int, obj) -> str:
    kk, ru, en = obj
    if lang == "kk":
        return f"{n} {kk}"
    if lang == "ru":
        return f"{n} {ru_plural(n, *ru)}"
    return f"{n} {en[0] if n == 1 else en[1]}"


def _question(lang: str, op: str, a: int, b: int, person, obj) -> str:
    kk_name, kk_loc, ru_name, ru_gen, en_name = person
    ru_many = obj[1][2]
    en_many = obj[2][1]
    if op == "add":
        return {
            "kk": f"{kk_loc} {_count('kk', a, obj)} бар. Ол тағы {_count('kk', b, obj)} алды. "
            f"{kk_loc} барлығы неше {obj[0]} бар?",
            "ru": f"У {ru_gen} {_count('ru', a, obj)}. {ru_name} получает ещё {_count('ru', b, obj)}. "
            f"Сколько {ru_many} теперь у {ru_gen}?",
            "en": f"{en_name} has {_count('en', a, obj)}. {en_name} gets {_count('en', b, obj)} more. "
            f"How many {en_many} does {en_name} have now?",
        }[lang]
    if op == "sub":
        return {
            "kk": f"{kk_loc} {_count('kk', a, obj)} бар. Ол {_count('kk', b, obj)} берді. "
            f"{kk_loc} неше {obj[0]} қалды?",
            "ru": f"У {ru_gen} {_count('ru', a, obj)}. {ru_name} отдаёт {_count('ru', b, obj)}. "
            f"Сколько {ru_many} осталось у {ru_gen}?",
            "en": f"{en_name} has {_count('en', a, obj)}. {en_name} gives away {_count('en', b, obj)}. "
            f"How many {en_many} does {en_name} have left?",
        }[lang]
    return {  # mul: a boxes with b objects each
        "kk": f"{kk_name} {a} қорап алды, әр қорапта {_count('kk', b, obj)} бар. "
        f"{kk_loc} барлығы неше {obj[0]} бар?",
        "ru": f"{ru_name} покупает {a} {ru_plural(a, 'коробку', 'коробки', 'коробок')}, в каждой "
        f"{_count('ru', b, obj)}. Сколько всего {ru_many} у {ru_gen}?",
        "en": f"{en_name} buys {a} {'box' if a == 1 else 'boxes'} with {_count('en', b, obj)} in each. "
        f"How many {en_many} does {en_name} have?",
    }[lang]


def arithmetic_problems(n: int, seed: int = 0, languages: tuple[str, ...] = LANGUAGES) -> list[Problem]:
    """n problems, languages in turn (kk, ru, en, kk, ...), operands drawn with `seed`: the same arguments give
    the same problems."""
    if n < 1:
        raise ValueError(f"arithmetic_problems: n {n} must be at least 1")
    bad = [x for x in languages if x not in LANGUAGES]
    if bad or not languages:
        raise ValueError(f"arithmetic_problems: languages {list(languages)} must be among {list(LANGUAGES)}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lang = languages[i % len(languages)]
        op = rng.choice(("add", "sub", "mul"))
        if op == "add":
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            answer = a + b
        elif op == "sub":
            a = rng.randint(2, 60)
            b = rng.randint(1, a - 1)
            answer = a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 12)
            answer = a * b
        question = _question(lang, op, a, b, rng.choice(_PEOPLE), rng.choice(_OBJECTS))
        out.append(Problem(f"arith-{seed}-{i}", lang, f"{_INSTRUCTION[lang]}\n{question}", str(answer)))
    return out


def load_gsm8k(path: Path, lang: str) -> list[Problem]:
    """Problems from a GSM8K-style jsonl: one {"question": ..., "answer": "... #### 72"} per line (the number
    after the last ####); a line without them is a ValueError naming the file and line."""
    from jobs.rlhf.rewards import final_answer

    if lang not in LANGUAGES:
        raise ValueError(f"load_gsm8k: lang {lang!r} must be one of {list(LANGUAGES)}")
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, solution = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{no}: not a GSM8K row with question and answer ({e})") from None
            answer = final_answer(solution)
            if not question.strip() or answer is None:
                raise ValueError(f"{path}:{no}: empty question or no '#### <answer>' in the answer")
            out.append(Problem(str(row.get("id", f"{Path(path).stem}-{no}")), lang, question.strip(), answer))
    if not out:
        raise ValueError(f"{path}: no problems (an empty prompt set cannot be trained on)")
    return out


def load_instructions(path: Path, limit: int | None = None) -> list[Problem]:
    """User prompts without reference answers from an SFT jsonl (`lang`, `instruction`, optional `input`, as in
    TULPAR_DATA/sft): the instruction, then the input after a blank line. For rewards that judge the answer
    itself (language consistency, format, a reward model, a judge)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                lang, instruction = row["lang"], str(row["instruction"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{no}: not an instruction row with lang and instruction ({e})"
                ) from None
            if lang not in LANGUAGES:
                raise ValueError(f"{path}:{no}: lang {lang!r} is not one of {list(LANGUAGES)}")
            extra = str(row.get("input") or "").strip()
            text = f"{instruction}\n\n{extra}" if extra else instruction
            if text:
                out.append(Problem(f"{Path(path).stem}-{no}", lang, text, None))
            if limit is not None and len(out) >= limit:
                break
    return out


def language_preference_pairs(paths: list[Path], per_file: int | None = None, seed: int = 0) -> list[dict]:
    """DPO-format preference records generated from SFT jsonl (`lang`, `instruction`, `input`, `output`): for each
    record, `chosen` is its own answer and `rejected` the answer of a random record in another language. A reward
    model trained on them learns to prefer an answer in the question's language (a learned counterpart of the
    `language_consistency` reward) -- a preference a small model can learn, unlike HH harmlessness."""
    rows: list[tuple[str, str, str]] = []  # (lang, prompt, answer)
    for path in paths:
        kept = 0
        with open(path, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    lang, instruction, output = (
                        rec["lang"],
                        str(rec["instruction"]).strip(),
                        str(rec["output"]),
                    )
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}:{no}: not an SFT row with lang, instruction, output ({e})"
                    ) from None
                extra = str(rec.get("input") or "").strip()
                if lang in LANGUAGES and instruction and output.strip():
                    rows.append((lang, f"{instruction}\n\n{extra}" if extra else instruction, output.strip()))
                    kept += 1
                if per_file is not None and kept >= per_file:
                    break
    by_lang: dict[str, list[str]] = {}
    for lang, _, answer in rows:
        by_lang.setdefault(lang, []).append(answer)
    if len(by_lang) < 2:
        raise ValueError(f"language pairs need SFT rows in at least two languages, got {sorted(by_lang)}")
    rng = random.Random(seed)
    out = []
    for lang, prompt, answer in rows:
        other = rng.choice(sorted(set(by_lang) - {lang}))
        out.append({"prompt": prompt, "chosen": answer, "rejected": rng.choice(by_lang[other]), "lang": lang})
    return out
