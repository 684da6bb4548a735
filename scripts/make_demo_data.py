"""Writes data/demo/{train,eval}.jsonl: a synthetic product catalogue for the offline demo.

Every row is made up by this script (seeded, so the files are reproducible). A product's price
follows simple rules the model can learn: base price of the item type x size factor x material
factor, +-5% noise. Fields match the real pricer data (title, text, price, category).

    python scripts/make_demo_data.py            # rewrites data/demo/
"""

import json
import random
from pathlib import Path

ITEMS = {  # item: (category, base price in dollars)
    "desk lamp": ("Home", 30), "office chair": ("Furniture", 150), "bookshelf": ("Furniture", 120),
    "coffee mug": ("Kitchen", 8), "frying pan": ("Kitchen", 35), "blender": ("Appliances", 60),
    "toaster": ("Appliances", 40), "tool box": ("Tools", 45), "drill": ("Tools", 90),
    "backpack": ("Outdoors", 50), "tent": ("Outdoors", 200), "bicycle": ("Sports", 400),
}
SIZES = {"small": 0.7, "medium": 1.0, "large": 1.5}
MATERIALS = {"plastic": 0.8, "wooden": 1.2, "steel": 1.6}
FILLERS = ["Ships in two days.", "Easy to clean.", "Great as a gift.", "One year warranty.", "Assembly required."]


def make_row(rng: random.Random) -> dict:
    item = rng.choice(sorted(ITEMS))
    size, material = rng.choice(sorted(SIZES)), rng.choice(sorted(MATERIALS))
    category, base = ITEMS[item]
    price = round(base * SIZES[size] * MATERIALS[material] * rng.uniform(0.95, 1.05), 2)
    title = f"{size.capitalize()} {material} {item}"
    return {"title": title, "text": f"{title}. {rng.choice(FILLERS)}", "price": price, "category": category}


def main() -> None:
    rng = random.Random(2026)
    out = Path(__file__).resolve().parent.parent / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 800), ("eval", 100)):
        rows = [make_row(rng) for _ in range(n)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {n} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
