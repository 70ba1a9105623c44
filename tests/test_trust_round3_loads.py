"""Trust, round three (issue 22, part 1): reading a weights file costs work proportional to
its size, and a file cannot change the reader's own objects.

Hostile pickles are written opcode by opcode (pickle.dumps cannot make most of them): a
dict or OrderedDict built by REDUCE from pairs whose key is a nested tuple shared through
the memo (2**79 steps to hash from 662 bytes), a list copied again and again by
tuple(...), BUILD on an allowed global or on numpy's own dtype. A property test builds
random pickles from the reader's opcodes and checks the counted work against the size.
"""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utils.safe_pickle as safe_pickle
from conftest import ROOT
from utils.errors import UserError
from utils.safe_pickle import UnsafeWeightsError, WeightsFileError, load_plain_pickle

REFUSED = "not a plain weights file (refusing to unpickle code)"
PROTO = b"\x80\x04"
STOP = b"."


def text(s: str) -> bytes:  # SHORT_BINUNICODE
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def shared_tuple(levels: int) -> bytes:
    """('x',) nested `levels` deep, each level holding the one below twice (DUP TUPLE2):
    3 bytes a level, 2**levels paths to hash."""
    return text("x") + b"\x85" + b"2\x86" * levels


def reduce_dict_from_pairs(cls: tuple[str, str], levels: int) -> bytes:
    """cls([(shared tuple, 1)]) through REDUCE: the dict hashes the key on building."""
    return (PROTO + b"}" + text("w") + glob(*cls) + shared_tuple(levels) + b"K\x01\x86" + b"\x85"  # [(key, 1)]
            + b"\x85" + b"R" + b"s" + STOP)


def load_in_subprocess(path, timeout=120) -> subprocess.CompletedProcess:
    """The reader in another process, so a reader that hangs fails the test instead of
    hanging the suite (a generous wall-clock guard; the work itself is counted below)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from utils.safe_pickle import load_plain_pickle;"
            "load_plain_pickle(sys.argv[2]); print('read')")
    return subprocess.run([sys.executable, "-c", code, ROOT, str(path)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("cls", [("builtins", "dict"), ("collections", "OrderedDict")])
def test_a_dict_built_from_pairs_with_a_shared_tuple_key_is_refused_at_once(tmp_path, cls):
    path = tmp_path / "hash_bomb.pdparams"
    path.write_bytes(reduce_dict_from_pairs(cls, 79))
    assert path.stat().st_size < 700  # the issue's 662 bytes: 2**79 steps to hash
    done = load_in_subprocess(path)
    assert done.returncode != 0 and done.stderr.strip().endswith(REFUSED), done.stderr[-2000:]


@pytest.mark.parametrize("cls", [("builtins", "dict"), ("collections", "OrderedDict")])
def test_containers_are_built_only_by_the_pickles_own_opcodes(tmp_path, cls):
    """Even flat pairs: dict(...) and OrderedDict(...) take no arguments (SETITEMS fills them)."""
    path = tmp_path / "pairs.pdparams"
    path.write_bytes(PROTO + glob(*cls) + text("a") + b"K\x01\x86\x85\x85R" + STOP)
    with pytest.raises(UnsafeWeightsError, match="refusing to unpickle code"):
        load_plain_pickle(str(path))
    path.write_bytes(PROTO + glob(*cls) + b")R" + text("a") + b"K\x01s" + STOP)  # as pickle writes it
    assert dict(load_plain_pickle(str(path))) == {"a": 1}


def test_a_shared_tuple_as_a_key_of_the_pickles_own_dict_is_refused(tmp_path):
    path = tmp_path / "key.pdparams"
    path.write_bytes(PROTO + b"}" + shared_tuple(79) + b"K\x01s" + STOP)
    done = load_in_subprocess(path)
    assert done.returncode != 0 and done.stderr.strip().endswith(REFUSED), done.stderr[-2000:]


def test_a_huge_int_key_hashed_again_and_again_is_refused(tmp_path):
    """Python hashes an int digit by digit each time: a 100 kB key set in 10**4 dicts would
    cost 10**9 steps from 200 kB."""
    big = (1 << 800_000) - 1
    raw = big.to_bytes((big.bit_length() + 8) // 8, "little", signed=True)
    body = b"\x8b" + struct.pack("<I", len(raw)) + raw + b"\x94"  # LONG4, memo 0
    body += b"(" + b"}h\x00K\x01s" * 10_000 + b"l"
    path = tmp_path / "intkey.pdparams"
    path.write_bytes(PROTO + body + STOP)
    with pytest.raises(UnsafeWeightsError):
        load_plain_pickle(str(path))


def test_a_list_copied_again_and_again_is_refused_within_the_work_its_size_allows(tmp_path):
    """tuple(list) of a memoised list of 10**5 items, 10**4 times: 10**9 elements copied by
    a 0.3 MB file. Each copy is counted; the file is refused once over its budget."""
    items = b"(" + b"K\x01" * 100_000 + b"l\x94"  # memo 0: the list
    calls = glob("builtins", "tuple") + b"\x94" + b"h\x00\x85\x94"  # memo 1: tuple, memo 2: (list,)
    copies = b"(" + b"h\x01h\x02R" * 10_000 + b"l"
    path = tmp_path / "copies.pdparams"
    path.write_bytes(PROTO + items + b"0" + calls + b"00" + copies + STOP)
    spent = []

    class Recorded(safe_pickle._Work):
        def spend(self, units):
            spent.append(units)
            super().spend(units)

    original = safe_pickle._Work
    safe_pickle._Work = Recorded
    try:
        with pytest.raises(UnsafeWeightsError):
            load_plain_pickle(str(path))
    finally:
        safe_pickle._Work = original
    assert sum(spent) <= safe_pickle.WORK_BASE + safe_pickle.WORK_PER_BYTE * path.stat().st_size + 100_000


def test_build_cannot_change_the_readers_own_objects(tmp_path):
    """BUILD on a global (the reader's stand-in for numpy.ndarray, numpy's dtype class)
    would set attributes for the rest of the process: refused, nothing changed."""
    before = dict(vars(safe_pickle._NdarrayName))
    state = b"N}" + text("__new__") + glob("builtins", "list") + b"s\x86"  # (None, {'__new__': list})
    for target in (glob("numpy", "ndarray"), glob("numpy", "dtype"), glob("collections", "OrderedDict")):
        path = tmp_path / "build.pdparams"
        path.write_bytes(PROTO + target + state + b"b" + STOP)
        with pytest.raises(UnsafeWeightsError):
            load_plain_pickle(str(path))
    assert dict(vars(safe_pickle._NdarrayName)) == before
    with pytest.raises(UnsafeWeightsError):  # still refuses to be called
        path.write_bytes(PROTO + glob("numpy", "ndarray") + b")R" + STOP)
        load_plain_pickle(str(path))


def test_build_cannot_change_numpys_own_dtype(tmp_path):
    """np.dtype('f4', False, False) is numpy's float32 descriptor itself: a BUILD on it
    would change every float32 array of the process. Only copies (copy=True) are made."""
    state = b"(K\x03" + text(">") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    path = tmp_path / "dtype.pdparams"
    for copy in (b"\x89", b"\x88"):  # NEWFALSE, NEWTRUE
        path.write_bytes(PROTO + b"}" + text("d") + glob("numpy", "dtype") + text("f4") + b"\x89" + copy
                         + b"\x87R" + state + b"b" + b"s" + STOP)
        with pytest.raises(UnsafeWeightsError):  # a dtype is no value of a weights file either
            load_plain_pickle(str(path))
    assert np.dtype("f4").byteorder in "=<" and np.array([1.0], np.float32).tobytes() == struct.pack("<f", 1.0)


def test_build_twice_on_one_array_is_refused(tmp_path):
    import pickle
    import pickletools

    arr = np.arange(3, dtype=np.float32)
    good = pickle.dumps(arr, protocol=4)
    path = tmp_path / "twice.pdparams"
    path.write_bytes(good)
    np.testing.assert_array_equal(load_plain_pickle(str(path)), arr)
    # BUILD again with the same state (the last memoised object): the array is no longer
    # one the reader has just made
    state_index = sum(op.name == "MEMOIZE" for op, _, _ in pickletools.genops(good)) - 1
    assert good.endswith(b"\x94b.")
    path.write_bytes(good[:-1] + b"h" + bytes([state_index]) + b"b" + STOP)
    with pytest.raises(UnsafeWeightsError):
        load_plain_pickle(str(path))


def test_setitem_on_an_array_is_refused(tmp_path):
    """arr[0] = a shared nested list makes numpy walk every path of the list."""
    good = __import__("pickle").dumps(np.zeros(1, np.float32), protocol=4)
    assert good.endswith(b".")
    path = tmp_path / "setitem.pdparams"
    path.write_bytes(good[:-1] + b"K\x00]" + b"2\x86" * 60 + b"s" + STOP)
    done = load_in_subprocess(path)
    assert done.returncode != 0 and done.stderr.strip().endswith(REFUSED), done.stderr[-2000:]


@pytest.mark.parametrize("levels, error", [(0, WeightsFileError), (20, UnsafeWeightsError)])
def test_big_param_slices_must_be_named_by_strings(tmp_path, levels, error):
    """Paddle's UnpackBigParamInfor@@ names slices: a slice 'name' that is a tuple would be
    hashed by dict.pop (a shared one path by path). A flat one is a damaged file; a shared
    one is refused before that, by the tree's walk."""
    path = tmp_path / "slices.pdparams"
    info = (b"}" + text("UnpackBigParamInfor@@") + b"}" + text("w") + b"}" + text("slices")
            + b"]" + text("x") + b"\x85" + b"2\x86" * levels + b"a" + b"s" + text("OriginShape") + b"K\x01\x85s"
            + b"ss")
    path.write_bytes(PROTO + info + STOP)
    with pytest.raises(error) as caught:
        load_plain_pickle(str(path))
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ the property

ALLOWED_GLOBALS = [("builtins", "dict"), ("collections", "OrderedDict"), ("builtins", "tuple"),
                   ("builtins", "list"), ("builtins", "bytes"), ("_codecs", "encode"), ("numpy", "ndarray"),
                   ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy._core.multiarray", "scalar"), ("posix", "system")]

FRAGMENT = st.one_of(
    st.sampled_from([b"N", b"\x88", b"\x89", b"]", b"}", b")", b"(", b"t", b"\x85", b"\x86", b"\x87", b"l",
                     b"d", b"a", b"e", b"s", b"u", b"\x94", b"2", b"0", b"R", b"b", b"\x8f", b"\x90",
                     b"\x91", b"\x81", b"\x92", b"o", text("latin1"), text("f4"), text("w"), text("x")]),
    st.integers(0, 255).map(lambda n: b"K" + bytes([n])),
    st.integers(0, 40).map(lambda n: b"h" + bytes([n])),
    st.binary(max_size=12).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.floats(allow_nan=True).map(lambda f: b"G" + struct.pack(">d", f)),
    st.sampled_from(ALLOWED_GLOBALS).map(lambda g: glob(*g)),
    st.integers(1, 80).map(lambda n: b"2\x86" * n),            # a shared nested tuple
    st.integers(1, 40).map(lambda n: b"(" + b"2" * n + b"l"),   # a list of n shared references
    st.integers(1, 40).map(lambda n: b"h\x00h\x01R" * n),       # one call made again and again
)


def _array_pickle(dtype: str, n: int) -> bytes:
    """numpy's own pickle of an array (protocol 2: no frames), without PROTO and STOP."""
    import pickle
    return pickle.dumps((np.arange(n) % 2).astype(dtype), protocol=2)[2:-1]


LEAF = st.one_of(
    st.sampled_from([b"N", b"\x88", b"\x89", b")", b"]", b"}", text("w"), text("latin1"), text("f4")]),
    st.integers(0, 255).map(lambda n: b"K" + bytes([n])),
    st.binary(max_size=8).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.integers(1, 200).map(lambda n: b"\x8a" + bytes([n]) + b"\x7f" * n),  # LONG1: an int of n bytes
    st.tuples(st.sampled_from(["f4", "f8", "i8", "u1", "?", "f2", "c8"]), st.integers(0, 6)).map(
        lambda a: _array_pickle(*a)),
    st.integers(0, 12).map(lambda i: b"h" + bytes([i])),  # a memoised value (may not exist: unreadable)
)
KEY = st.one_of(st.sampled_from([text("a"), text("b"), b"K\x01", b"N"]),
                st.integers(1, 70).map(lambda n: text("x") + b"\x85" + b"2\x86" * n))  # a shared tuple key


def _structures(children):
    values = st.lists(children, max_size=4).map(b"".join)
    return st.one_of(
        values.map(lambda v: b"(" + v + b"t"),                               # tuple
        values.map(lambda v: b"](" + v + b"e"),                              # list, APPENDS
        st.lists(st.tuples(KEY, children), max_size=3).map(                  # dict, SETITEMS
            lambda kv: b"}(" + b"".join(k + v for k, v in kv) + b"u"),
        st.tuples(children, st.integers(1, 70)).map(lambda a: a[0] + b"2\x86" * a[1]),  # shared nesting
        st.tuples(st.sampled_from(ALLOWED_GLOBALS), children).map(            # a call of one argument
            lambda a: glob(*a[0]) + a[1] + b"\x85R"),
        st.tuples(st.sampled_from(ALLOWED_GLOBALS), children, children).map(  # a call of two (scalar, encode)
            lambda a: glob(*a[0]) + a[1] + a[2] + b"\x86R"),
        st.sampled_from(ALLOWED_GLOBALS).map(lambda g: glob(*g) + b")R"),    # a call of none
        st.tuples(children, children).map(lambda a: a[0] + a[1] + b"b"),     # BUILD
        st.tuples(children, st.integers(1, 30)).map(                         # memoised, then used n times
            lambda a: a[0] + b"\x94" + b"0" + b"(" + b"h\x00" * a[1] + b"l"),
        children.map(lambda v: v + b"\x94"),
    )


STRUCTURED = st.recursive(LEAF, _structures, max_leaves=40)


def _tree_size(obj, cap):
    """Nodes of `obj` walked as a tree (each path), stopping at `cap`."""
    count, stack = 0, [obj]
    while stack and count <= cap:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
            stack.extend(node.keys())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return count


@settings(max_examples=500, deadline=20000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(STRUCTURED.map(lambda v: [v]), st.lists(FRAGMENT, max_size=60)))
def test_reading_any_pickle_of_the_readers_opcodes_costs_work_proportional_to_its_size(tmp_path_factory, fragments):
    """Random pickles of the opcodes the reader accepts (and of the calls it allows, some
    repeated through the memo, some on shared nested tuples), either well-formed values
    built from a grammar (containers, keys, calls, BUILD, memo) or a soup of opcodes:
    each is read or refused with
    a UserError, never another exception; the work the reader counted (elements copied,
    bytes copied into arrays, values visited) is within the bound for the file's size; and
    what it returns can itself be walked as a tree within that bound. The deadline is the
    wall-clock guard for work that might escape the count."""
    data = PROTO + b"".join(fragments) + STOP
    path = tmp_path_factory.mktemp("prop") / "random.pdparams"
    path.write_bytes(data)
    works = []

    class Recorded(safe_pickle._Work):
        def __init__(self, size):
            super().__init__(size)
            works.append(self)

    original = safe_pickle._Work
    safe_pickle._Work = Recorded
    try:
        try:
            result = load_plain_pickle(str(path))
        except UserError:
            result = None
    finally:
        safe_pickle._Work = original
    bound = safe_pickle.WORK_BASE + safe_pickle.WORK_PER_BYTE * len(data)
    assert len(works) == 1 and works[0].limit == bound
    assert works[0].spent <= bound + 2 * len(data)  # the last spend that crossed the bound included
    assert _tree_size(result, 2 * bound) <= bound


# ------------------------------------------------------------------ the commands that read such files

TINY = ["--arch", "resnet18", "--image_size", "64", "--batch_size", "1", "--epochs", "1", "--eval_interval", "0",
        "--log_interval", "0", "--no_report"]


def run_main(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *TINY, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("role", ["checkpoint in --mode eval", "--teacher_weights in training"])
def test_the_issues_hash_bomb_is_one_line_from_main(tmp_path, role):
    """The 662-byte file hung `--mode eval` (as a checkpoint) and training (as
    --teacher_weights) for ever; now each ends with one line, exit status 2."""
    import shutil

    bomb = reduce_dict_from_pairs(("collections", "OrderedDict"), 79)
    data = tmp_path / "data"
    shutil.copytree(os.path.join(ROOT, "sample_data", "bottle"), data / "widget")
    out = tmp_path / "out"
    if role.startswith("checkpoint"):
        (out / "widget").mkdir(parents=True)
        target = out / "widget" / "model.pdparams"
        target.write_bytes(bomb)
        done = run_main("--teacher_weights", "none", "--mode", "eval", "--data_dir", str(data),
                        "--output_dir", str(out), "--cls", "widget")
    else:
        target = tmp_path / "teacher.pdparams"
        target.write_bytes(bomb)
        done = run_main("--teacher_weights", str(target), "--data_dir", str(data), "--output_dir", str(out))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines[-1].startswith("error: ") and str(target) in lines[-1] and lines[-1].endswith(REFUSED), lines[-3:]
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in done.stderr


# ------------------------------------------------------------------ round four (hostile tester)

def bytes_call(module: str, name: str, *args: str) -> bytes:
    """module.name(*args) through REDUCE, each argument a BINUNICODE string."""
    body = b"".join(b"X" + struct.pack("<I", len(a.encode())) + a.encode() for a in args)
    return PROTO + glob(module, name) + b"(" + body + b"tR" + STOP


@pytest.mark.parametrize("codec", ["punycode", "idna", "utf-7", "rot13", "hex", "zlib", "utf-16", "bogus"])
@pytest.mark.parametrize("call", [("builtins", "bytes"), ("__builtin__", "bytes"), ("_codecs", "encode")])
def test_bytes_from_text_through_any_codec_but_latin1_is_refused(tmp_path, call, codec):
    """bytes(str, 'punycode') is quadratic (60 KB of text: 130 s): a codec other than latin1
    (the one protocol 2 writes) is refused before it runs, whatever the text."""
    path = tmp_path / "codec.pdparams"
    path.write_bytes(bytes_call(*call, "".join(chr(0x4E00 + i) for i in range(2000)), codec))
    with pytest.raises(UnsafeWeightsError, match="refusing to unpickle code"):
        load_plain_pickle(str(path))


@pytest.mark.parametrize("args, expected", [((), b""), (("ab\xff", "latin1"), b"ab\xff"),
                                            (("ab", "latin-1"), b"ab")])
def test_bytes_as_protocol_two_writes_them_still_load(tmp_path, args, expected):
    path = tmp_path / "bytes.pdparams"
    path.write_bytes(bytes_call("builtins", "bytes", *args))
    assert load_plain_pickle(str(path)) == expected


@pytest.mark.parametrize("args", [("abc",), ("abc", "latin1", "strict"), ("abc", "latin1", "ignore")])
def test_bytes_with_other_arguments_is_refused(tmp_path, args):
    path = tmp_path / "bytes.pdparams"
    path.write_bytes(bytes_call("builtins", "bytes", *args))
    with pytest.raises(UnsafeWeightsError, match="refusing to unpickle code"):
        load_plain_pickle(str(path))


@pytest.mark.parametrize("where", ["top", "nested"])
def test_one_array_shared_under_many_keys_is_refused_as_the_work_it_would_cost(tmp_path, where):
    """Pickle's memo lets one 256 KB array stand under 2000 keys for 20 KB more file: every
    check that scans values per key (finiteness in check_checkpoint and the training
    state's) would cost 2000 x 256 KB. The reader counts each array's bytes once per path,
    so the file is refused by the loader every command uses, before any scan."""
    import pickle

    from engine.checkpoint import CheckpointError, load_checkpoint

    shared = np.zeros(1 << 16, np.float32)
    weights = {f"w{i}": shared for i in range(2000)}
    state = {"format": "rd4ad-paddle/1", "student": weights} if where == "nested" else weights
    path = tmp_path / "model.pdparams"
    path.write_bytes(pickle.dumps(state, protocol=4))
    assert path.stat().st_size < 2 * shared.nbytes  # the file holds it once
    with pytest.raises(UnsafeWeightsError, match="refusing to unpickle code"):
        load_plain_pickle(str(path))
    with pytest.raises(CheckpointError, match="refusing to unpickle code"):
        load_checkpoint(str(path))
    # the same array under a few keys is still within the file's budget
    path.write_bytes(pickle.dumps({f"w{i}": shared for i in range(4)}, protocol=4))
    assert len(load_plain_pickle(str(path))) == 4
