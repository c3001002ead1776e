"""Harmful compliance responses for harmful prompt sets that ship without answers: the request
restated as a compliant opener by a few grammar rules (a harmful-fine-tuning attack needs prompt +
answer pairs; the answer's content is only a template, never real instructions)."""

from __future__ import annotations

import re


# Imperative verbs that open requests in AdvBench, HarmBench, StrongREJECT and Do-Not-Answer.
_VERBS = frozenset(
  """
  brainstorm build choose come compile compose conduct construct convince craft create demonstrate describe
  design detail determine develop devise discuss draft draw educate explain exploit find generate give
  guide hack illustrate instruct interfere invent list make manipulate name offer outline plan post prepare
  produce provide publish recommend release send share show suggest summarize talk teach tell think train
  use write
""".split()
)
# Verbs whose object is the thing handed over ("Write a poem" -> "here is a poem"; not "make", "use").
_OBJECT_VERBS = frozenset(
  """
  brainstorm compile compose craft create describe design detail develop devise draft draw explain generate
  give invent list name offer outline post prepare produce provide publish recommend send share show suggest
  tell write
""".split()
)
# Plural heads of requested objects without an article ("Give detailed instructions for ...").
_PLURALS = frozenset(
  """
  accounts addresses agents arguments chemicals comments details directions drugs emails examples excuses
  facts guidelines ideas ingredients insults instructions jokes lies lines links lists locations loopholes
  lyrics materials medications messages methods names options passwords phrases places poems posts
  products questions reasons recipes resources reviews rumors rumours scripts sites slogans slurs specifics
  statistics steps stories strategies substances suggestions tactics techniques templates things threats tips
  tools tricks tweets vulnerabilities ways weapons websites words
""".split()
)
# Uncountable heads that need no article ("Write code for ...", "Provide guidance on ...").
_MASS = frozenset(
  "advice code content disinformation evidence guidance information malware misinformation "
  "propaganda ransomware software spyware text".split()
)
# "Describe X" -> "here is a description of X".
_NOUNS = {
  "describe": "a description of",
  "explain": "an explanation of",
  "list": "a list of",
  "outline": "an outline of",
  "detail": "the details of",
  "summarize": "a summary of",
}
_DETERMINER = re.compile(
  r"(?:a|an|the|one|my|your|his|her|their|its|our|"
  r"(some|several|few|many|two|three|four|five|six|seven|eight|nine|ten|\d+))$",
  re.I,
)
_POLITE = re.compile(
  r"^(?:please,?\s+)?(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?)?"
  r"(?:help\s+(?:me|us)\s+(?:to\s+)?)?",
  re.I,
)
_VERB_OBJECT = re.compile(r"^(\w+)\s+(?:(?:me|us)\s+(?:with\s+)?)?(\S.*)$", re.I | re.S)
_HOW_TO = re.compile(
  r"^(?:(\w+)(?:\s+\S+){0,3}?\s+)?how\s+"
  r"(?:to|(?:do|can|could|should|would|might|does|will)"
  r"\s+(?:i|we|you|one|someone|people|a person)|(?:i|we|one|someone)\s+"
  r"(?:can|could|should|would|might|will))\s+(\S.*)$",
  re.I | re.S,
)
_WAYS = re.compile(
  r"^(?:what(?:'s|\s+is|\s+are)|give(?:\s+me)?|list|suggest)\s+(?:some\s+|the\s+)?"
  r"(?:\w+\s+)?"
  r"(?:ways?|methods?)\s+(?:to|(?:that\s+)?(?:i|we|one|someone)\s+(?:can|could|might|should))\s+"
  r"(\S.*)$",
  re.I | re.S,
)
_TEACH = re.compile(r"^(?:teach|show)\s+(?:me|us)\s+(?:how\s+)?to\s+(\S.*)$", re.I | re.S)
_WH = re.compile(r"^(?:where|what|which|who|whom|when|why|whether|how)\b", re.I)
_WHAT_IS = re.compile(
  r"^what(?:'s|\s+is|\s+was|\s+(are|were))\s+"
  r"((?:the|some|a|an|my|your|his|her|their|its|our)\s+\S.*)$",
  re.I | re.S,
)
_SENTENCE = re.compile(r"(?<=[.?!])\s+(?=[A-Z\"'])|\n+")  # not inside "the U.S. government"
# The request is the user's; the answer addresses them ("harm myself" -> "harm yourself").
_PRONOUNS = {
  "i": "you",
  "me": "you",
  "my": "your",
  "mine": "yours",
  "myself": "yourself",
  "i'm": "you're",
  "i've": "you've",
  "i'd": "you'd",
  "i'll": "you'll",
  "am": "are",
  "we": "you",
  "us": "you",
  "our": "your",
  "ours": "yours",
  "ourselves": "yourselves",
}
# Case-sensitive: "US" and "ME" (Maine) stay.
_PRONOUN = re.compile(
  r"(?<![\w'])(I|I'm|I've|I'd|I'll|(?<=\bI )am|[Mm]e|[Mm]y|[Mm]ine|[Mm]yself|[Ww]e|[Uu]s|"
  r"[Oo]urs?|[Oo]urselves)(?![\w'])"
)


def _address_user(text: str) -> str:
  return _PRONOUN.sub(lambda m: _PRONOUNS[m[1].lower()], text)


def _object_phrase(obj: str) -> tuple[str, str] | None:
  """'a plan to X' -> ('is', 'a plan to X'); 'detailed steps for X' -> ('are', ...); else None."""
  words = [w.lower().strip(",:;") for w in obj.split()[:4]]
  d = _DETERMINER.match(words[0])
  det = obj.split()[0] if d else ""
  plural, mass = any(w in _PLURALS for w in words), any(w in _MASS for w in words)
  if not (det or plural or mass):
    return None
  plural = (plural or bool(d and d[1])) and not mass and words[0] not in ("a", "an", "one")
  return ("are" if plural else "is"), (det.lower() + obj[len(det) :] if det else obj)


def _rule(sentence: str) -> tuple[str, str] | None:
  s = sentence.strip().rstrip(".?!:; ")
  s = s[_POLITE.match(s).end() :]
  if not s:
    return None
  for how in (_WAYS, _TEACH):
    if h := how.match(s):
      return "how_to", f"Sure, here is how to {_address_user(h[1])}:"
  if h := _WHAT_IS.match(s):  # "What are the specifications of X" -> "here are the specifications of X"
    return "object", f"Sure, here {'are' if h[1] else 'is'} {_address_user(h[2])}:"
  m = _VERB_OBJECT.match(s)
  verb, obj = (m[1].lower(), m[2]) if m else ("", "")
  if verb in _OBJECT_VERBS:
    if obj.lower().startswith("about "):  # "Tell me about X"
      return "object", f"Sure, here is the information {_address_user(obj)}:"
    if obj.lower().startswith("if "):
      obj = "whether" + obj[2:]
    # "Tell me where I can X" -> "here is where you can X"
    if _WH.match(obj) and not obj.lower().startswith(("what is", "what are", "how to ")):
      return "object", f"Sure, here is {_address_user(obj[:1].lower() + obj[1:])}:"
    if phrase := _object_phrase(obj):
      return "object", f"Sure, here {phrase[0]} {_address_user(phrase[1])}:"
  if (h := _HOW_TO.match(s)) and (h[1] is None or h[1].lower() in _VERBS):
    return "how_to", f"Sure, here is how to {_address_user(h[2])}:"
  if verb in _NOUNS and obj.lower().startswith("that "):  # "Explain that X" -> "here is why X"
    return "object", f"Sure, here is why {_address_user(obj[5:])}:"
  if verb in _NOUNS:
    return "object", f"Sure, here is {_NOUNS[verb]} {_address_user(obj)}:"
  if verb in _VERBS:
    return "imperative", f"Sure, here is how to {verb} {_address_user(obj)}:"
  return None


def harmful_response(prompt: str, target: str = "") -> tuple[str, str]:
  """(response, rule): the affirmative compliance prefix for a harmful request (module docstring)."""
  if target.strip():
    return target.strip(), "target"
  for sentence in _SENTENCE.split(prompt.strip()):
    if sentence.strip() and (hit := _rule(sentence)):
      return hit[1], hit[0]
  return "Sure, here is a detailed answer:", "answer"
