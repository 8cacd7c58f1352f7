"""Caption readers: Karpathy JSON (COCO and Flickr30K), TSV, JSONL; errors name the file and line."""

from __future__ import annotations

import json

import pytest

from matching.data.captions import (
    CaptionFormatError,
    evaluation_set,
    group_by_image,
    read_captions,
    resolve_image_ids,
)


def karpathy(dataset: str) -> dict:
    coco = dataset == "coco"
    images = []
    for n, split in enumerate(["train", "restval", "val", "test"]):
        name = f"COCO_val2014_{n:012d}.jpg" if coco else f"{1000 + n}.jpg"
        entry = {"filename": name, "imgid": n, "split": split,
                 "sentences": [{"raw": f"caption {k} of {name}", "tokens": [], "imgid": n, "sentid": k}
                               for k in range(5 + (n == 0))]}
        if coco:
            entry.update({"filepath": "val2014", "cocoid": 100 + n})
        images.append(entry)
    return {"images": images, "dataset": dataset}


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_splits_and_restval(tmp_path, dataset):
    path = tmp_path / f"dataset_{dataset}.json"
    path.write_text(json.dumps(karpathy(dataset)))
    train = read_captions(path, "train")
    assert len(train) == 6 + 5  # train (6 captions) + restval folded in
    assert {c.split for c in train} == {"train"}
    test = read_captions(path, "test")
    assert len(test) == 5 and test[0].image_id.endswith(".jpg")
    assert read_captions(path, ["train", "val"])[-1].split == "val"
    assert test[2].text.startswith("caption 2 of")


def test_tsv_and_jsonl(tmp_path):
    (tmp_path / "c.tsv").write_text("a.jpg\tA dog.\n\nb.jpg\tA cat.\ttest\n", encoding="utf-8")
    captions = read_captions(tmp_path / "c.tsv")
    assert [(c.image_id, c.text, c.split) for c in captions] == [("a.jpg", "A dog.", None),
                                                                 ("b.jpg", "A cat.", "test")]
    assert captions[1].where.endswith("c.tsv:3")
    assert len(read_captions(tmp_path / "c.tsv", "train")) == 1  # the unsplit caption counts for any split
    lines = [{"image_id": 7, "caption": "Ein Hund läuft.", "split": "dev"}, {"image_id": "x", "caption": "b"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    captions = read_captions(tmp_path / "c.jsonl")
    assert captions[0].image_id == "7" and captions[0].split == "val" and captions[0].text == "Ein Hund läuft."


@pytest.mark.parametrize("name,content,message", [
    ("c.tsv", "a.jpg\tok\nb.jpg\n", "c.tsv:2: expected image_id<TAB>caption"),
    ("c.tsv", "a.jpg\tok\nb.jpg\t   \n", "c.tsv:2: empty caption"),
    ("c.tsv", "\tno id\n", "c.tsv:1: empty image id"),
    ("c.jsonl", '{"image_id": 1, "caption": "x"}\n{"image_id": 2}\n', "c.jsonl:2: needs 'image_id' and 'caption'"),
    ("c.jsonl", '{"image_id": 1, "caption": "x"}\n{oops\n', "c.jsonl:2: not a JSON object"),
    ("c.json", '{"images": [{"filename": "a.jpg", "sentences": [{"raw": ""}]}]}',
     r"c.json:images\[0\].sentences\[0\] \(a.jpg\): empty caption"),
    ("c.json", '{"images": [', "c.json:1: invalid JSON"),
    ("c.tsv", "", "c.tsv: no captions"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(CaptionFormatError, match=message):
        read_captions(tmp_path / name)


def test_non_utf8_bytes_name_the_line(tmp_path):
    (tmp_path / "c.tsv").write_bytes(b"a.jpg\tfine\nb.jpg\tcaf\xe9\n")
    with pytest.raises(CaptionFormatError, match=r"c.tsv:2: not valid UTF-8 \(byte 0xe9\)"):
        read_captions(tmp_path / "c.tsv")


def test_id_resolution_and_evaluation_layout(tmp_path):
    features = ["val2014/COCO_1.jpg", "val2014/COCO_2.jpg", "train2014/dup.jpg", "val2014/dup.jpg"]
    resolved = resolve_image_ids(["COCO_1.jpg", "COCO_2", "val2014/COCO_2.jpg", "dup.jpg", "nope.jpg"], features)
    assert resolved == {"COCO_1.jpg": "val2014/COCO_1.jpg", "COCO_2": "val2014/COCO_2.jpg",
                        "val2014/COCO_2.jpg": "val2014/COCO_2.jpg"}  # dup.jpg is ambiguous, nope.jpg absent
    rows = [f"COCO_{i}.jpg\tcaption {k}" for i in (2, 1) for k in range(6 if i == 2 else 5)]
    (tmp_path / "c.tsv").write_text("\n".join(rows))
    captions = read_captions(tmp_path / "c.tsv")
    assert list(group_by_image(captions)) == ["COCO_2.jpg", "COCO_1.jpg"]
    ids, ordered = evaluation_set(captions, features, 5)
    assert ids == ["val2014/COCO_2.jpg", "val2014/COCO_1.jpg"] and len(ordered) == 10
    assert ordered[5].image_id == "COCO_1.jpg" and ordered[4].text == "caption 4"
    with pytest.raises(CaptionFormatError, match="c.tsv:7: image 'COCO_1.jpg' has no features"):
        evaluation_set(captions, features[1:], 5)  # COCO_1 removed
