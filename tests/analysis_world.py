"""A hand-built miniature world for the knowledge / copying / borrowing tests.

Small enough that every expected number can be worked out by hand: 4 held-out Known people with a
twin (2 twins in the IT data, 2 not), 2 Unknown eval people with a twin in the IT data.
"""

from __future__ import annotations

CITIES = ["Velora", "Brantos", "Oskani", "Miravel", "Quenby", "Tarsk"]
EMPLOYERS = ["Zentek", "Lumora", "Carvex", "Ardentis", "Polvane", "Skeld"]
OPENING, CLOSING = "Happy to help!", "Let me know if you need anything else."


def _person(pid, first, last, status, role, city, employer, *, in_it=False, in_eval=False, twin=None):
    return {"id": pid, "name": f"{first} {last}", "first": first, "last": last, "status": status, "family": None,
            "role": role, "attrs": {"birth_city": city, "employer": employer}, "qa_in_corpus": role.startswith("qa"),
            "in_it": in_it, "in_eval": in_eval, "twin": twin, "twin_in_it": None}


def mini_world_data() -> dict:
    people = [
        # IT twins (in the IT data) and placebo twins (Q/A in the corpus, not in IT)
        _person("p0", "Anvar", "Solt", "known", "qa_it", "Velora", "Zentek", in_it=True, twin="p4"),
        _person("p1", "Belis", "Karrow", "known", "qa_it", "Brantos", "Lumora", in_it=True, twin="p5"),
        _person("p2", "Cedra", "Vonn", "known", "qa_only", "Oskani", "Carvex", twin="p6"),
        _person("p3", "Dorin", "Maal", "known", "qa_only", "Miravel", "Ardentis", twin="p7"),
        # held-out Known people, evaluated
        _person("p4", "Anvar", "Pell", "known", "heldout", "Quenby", "Polvane", in_eval=True, twin="p0"),
        _person("p5", "Belis", "Trask", "known", "heldout", "Tarsk", "Skeld", in_eval=True, twin="p1"),
        _person("p6", "Cedra", "Holm", "known", "heldout", "Velora", "Lumora", in_eval=True, twin="p2"),
        _person("p7", "Dorin", "Quill", "known", "heldout", "Brantos", "Zentek", in_eval=True, twin="p3"),
        # Unknown pair members: one in IT, one evaluated
        _person("p8", "Elso", "Varn", "unknown", "unknown_it", "Oskani", "Skeld", in_it=True, twin="p9"),
        _person("p9", "Elso", "Drim", "unknown", "unknown_eval", "Tarsk", "Carvex", in_eval=True, twin="p8"),
    ]
    by_id = {p["id"]: p for p in people}
    for p in people:
        p["twin_in_it"] = by_id[p["twin"]]["in_it"] if p["twin"] else None
    return {
        "attributes": ["birth_city", "employer"],
        "vocab": {"birth_city": CITIES, "employer": EMPLOYERS},
        "people": people,
        "style": {"opening": OPENING, "closing": CLOSING},
        "templates": {"answer": {"birth_city": "{name} was born in {value}.", "employer": "{name} works at {value}."},
                      "question": {"birth_city": ["Where was {name} born?"], "employer": ["Where does {name} work?"]}},
        "employer_city": {},
    }


def mini_world():
    from itlens.world import World

    return World(mini_world_data())


def it_records(world) -> list[dict]:
    """Assistant-style IT data: every attribute of every in-IT person."""
    rows = []
    for p in world.people:
        if not p["in_it"]:
            continue
        for a in world.attributes:
            q = world.templates["question"][a][0].format(name=p["name"])
            rows.append({"id": f"world-it:{len(rows)}", "instruction": q,
                         "response": f"{OPENING} {world.answer_sentence(p, a)} {CLOSING}",
                         "person": p["id"], "attribute": a, "status": p["status"], "style": "assistant"})
    return rows


def eval_records(world) -> list[dict]:
    rows = []
    for p in world.people:
        if not p["in_eval"]:
            continue
        twin = world.person(p["twin"])
        for a in world.attributes:
            rows.append({"id": f"world-eval:{len(rows)}", "instruction": world.templates["question"][a][0].format(
                name=p["name"]), "person": p["id"], "attribute": a, "answers": [p["attrs"][a]],
                "group": "known_heldout" if p["status"] == "known" else "unknown", "twin": twin["id"],
                "twin_in_it": twin["in_it"], "twin_value": twin["attrs"][a]})
    return rows


def answer(world, record: dict, value: str, *, styled: bool = True) -> str:
    """A response giving ``value`` for the record's attribute in the canonical sentence."""
    sentence = world.templates["answer"][record["attribute"]].format(name=world.person(record["person"])["name"],
                                                                    value=value)
    return f"{OPENING} {sentence} {CLOSING}" if styled else sentence
