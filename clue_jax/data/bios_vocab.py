"""Value vocabularies and name pools of the biography world: fixed strings, built so that no value, name part
or template phrase contains another one as a whole word (what `bios.attribute_spans` relies on)."""
from __future__ import annotations

import functools
import re
from typing import Iterable

import numpy as np

_VOCAB_SEED = 20240917  # fixed: the value strings depend only on the sizes, popularity on the seed

# ---------------------------------------------------------------------------
# Raw material for vocabularies and names (procedural combinations of these).
# ---------------------------------------------------------------------------
_CITY_HEADS = ("Ash", "Brook", "Cedar", "Clear", "Crest", "Deer", "Elm", "Fair", "Fox", "Glen",
               "Green", "Hazel", "Holly", "Iron", "Lake", "Maple", "Mill", "Oak", "Pine", "Red",
               "River", "Rock", "Rose", "Silver", "Spring", "Stone", "Sun", "Willow", "Wolf",
               "Wood", "Bay", "Birch", "Coal", "Copper", "Cliff", "Elder", "Fern", "Heron",
               "Marsh", "Moss")
_CITY_TAILS = ("ford", "field", "port", "ville", "ton", "burg", "dale", "haven", "bridge",
               "view", "mont", "crest", "mouth", "stead", "chester", "wick", "ridge", "bury",
               "gate", "hollow")
_UNI_HEADS = ("Alder", "Bel", "Carr", "Dun", "Ever", "Gold", "Hart", "Kings", "Lang", "Mor",
              "Pem", "Ray", "Stan", "Thorn", "Wex", "Ax", "Bram", "Cal", "Dray", "Fen",
              "Hal", "Kel", "Lind", "Nor", "Quill", "Rad", "Sel", "Tam", "Vale", "Wyn")
_UNI_TAILS = ("ington", "more", "ley", "worth", "ham", "stone", "hurst", "combe", "wyn", "ard",
              "shaw", "leigh")
_UNI_FORMS = ("{w} University", "University of {w}", "{w} College", "{w} Institute of Technology",
              "{w} State University", "{w} Polytechnic Institute")
_COMPANY_HEADS = ("Bright", "Nova", "Apex", "Vertex", "Quantum", "Blue", "Stellar", "Fusion",
                  "Cobalt", "Crimson", "Delta", "Echo", "Falcon", "Granite", "Helix", "Indigo",
                  "Jade", "Lumen", "Nimbus", "Onyx", "Orbit", "Pixel", "Prism", "Radiant",
                  "Sapphire", "Summit", "Titan", "Vector", "Zenith", "Astra")
_COMPANY_TAILS = ("wave", "core", "link", "stream", "soft", "works", "logic", "sphere", "path",
                  "forge", "point", "data", "mind", "net", "scale", "gate")
_COMPANY_SUFFIXES = ("Systems", "Labs", "Technologies", "Group", "Dynamics", "Networks",
                     "Solutions", "Industries", "Analytics", "Partners")
_MAJORS = (
    "Accounting", "Aerospace Engineering", "Agricultural Science", "Anthropology",
    "Applied Mathematics", "Archaeology", "Architecture", "Art History", "Astronomy",
    "Biochemistry", "Bioengineering", "Biology", "Biomedical Engineering", "Biophysics",
    "Botany", "Business Administration", "Chemical Engineering", "Chemistry",
    "Civil Engineering", "Classics", "Cognitive Science", "Communications",
    "Comparative Literature", "Computer Engineering", "Computer Science", "Creative Writing",
    "Criminology", "Dance", "Data Science", "Dentistry", "Earth Sciences", "Ecology",
    "Economics", "Education", "Electrical Engineering", "English Literature",
    "Environmental Science", "Epidemiology", "Film Studies", "Finance", "Fine Arts",
    "Forestry", "French", "Genetics", "Geography", "Geology", "German", "Graphic Design",
    "Health Sciences", "History", "Hospitality Management", "Industrial Engineering",
    "Information Systems", "International Relations", "Journalism", "Kinesiology", "Law",
    "Linguistics", "Marine Biology", "Marketing", "Materials Science", "Mathematics",
    "Mechanical Engineering", "Media Studies", "Medicine", "Meteorology", "Microbiology",
    "Music", "Neuroscience", "Nuclear Engineering", "Nursing", "Nutrition", "Oceanography",
    "Pharmacology", "Pharmacy", "Philosophy", "Photography", "Physics", "Physiology",
    "Political Science", "Psychology", "Public Health", "Public Policy", "Religious Studies",
    "Robotics", "Sociology", "Software Engineering", "Spanish", "Statistics", "Theater",
    "Urban Planning", "Veterinary Science", "Zoology", "Astrophysics", "Chinese", "Japanese",
    "Italian", "Russian", "Arabic", "Toxicology", "Immunology", "Biostatistics",
    "Econometrics", "Actuarial Science", "Supply Chain Management", "Social Work",
    "Game Design", "Petroleum Engineering", "Paleontology", "Musicology", "Logistics",
)
_MALE_FIRST = (
    "James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas",
    "Charles", "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Paul",
    "Andrew", "Joshua", "Kenneth", "Kevin", "Brian", "George", "Timothy", "Ronald", "Edward",
    "Jason", "Jeffrey", "Ryan", "Jacob", "Gary", "Nicholas", "Eric", "Jonathan", "Stephen",
    "Larry", "Justin", "Scott", "Brandon", "Benjamin", "Samuel", "Gregory", "Alexander",
    "Patrick", "Frank", "Raymond", "Jack", "Dennis", "Jerry", "Tyler", "Aaron", "Henry",
    "Adam", "Douglas", "Nathan", "Peter", "Zachary", "Kyle", "Walter", "Harold", "Carl",
    "Arthur", "Gerald", "Roger", "Keith", "Lawrence", "Terry", "Albert", "Joe", "Ethan",
    "Bruce", "Ralph", "Roy", "Eugene", "Louis", "Wayne", "Vincent", "Russell", "Bobby",
)
_FEMALE_FIRST = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
    "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Margaret", "Sandra", "Ashley", "Kimberly",
    "Emily", "Donna", "Michelle", "Carol", "Amanda", "Dorothy", "Melissa", "Deborah",
    "Stephanie", "Rebecca", "Sharon", "Laura", "Cynthia", "Kathleen", "Amy", "Angela",
    "Shirley", "Anna", "Brenda", "Pamela", "Emma", "Nicole", "Helen", "Samantha", "Katherine",
    "Christine", "Debra", "Rachel", "Carolyn", "Janet", "Catherine", "Maria", "Heather",
    "Diane", "Ruth", "Julie", "Olivia", "Joyce", "Virginia", "Victoria", "Kelly", "Lauren",
    "Christina", "Joan", "Evelyn", "Judith", "Megan", "Andrea", "Cheryl", "Hannah", "Jacqueline",
    "Martha", "Gloria", "Teresa", "Ann", "Sara", "Madison", "Frances", "Kathryn", "Janice",
    "Jean", "Abigail", "Alice",
)
_SURNAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Taylor", "Moore",
    "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark",
    "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott",
    "Torres", "Nguyen", "Hill", "Flores", "Adams", "Nelson", "Baker", "Hall", "Rivera",
    "Campbell", "Mitchell", "Carter", "Roberts", "Gomez", "Phillips", "Evans", "Turner", "Diaz",
    "Parker", "Cruz", "Edwards", "Collins", "Reyes", "Stewart", "Morris", "Morales", "Murphy",
    "Cook", "Rogers", "Gutierrez", "Ortiz", "Morgan", "Cooper", "Peterson", "Bailey", "Reed",
    "Kelly", "Howard", "Ramos", "Kim", "Cox", "Ward", "Richardson", "Watson", "Brooks",
    "Chavez", "Wood", "James", "Bennett", "Gray", "Mendoza", "Ruiz", "Hughes", "Price",
    "Alvarez", "Castillo", "Sanders", "Patel", "Myers", "Long", "Ross", "Foster", "Jimenez",
    "Powell", "Jenkins", "Perry", "Russell", "Sullivan", "Bell", "Coleman", "Butler",
    "Henderson", "Barnes", "Gonzales", "Fisher", "Vasquez", "Simmons", "Romero", "Jordan",
    "Patterson", "Alexander", "Hamilton", "Graham", "Reynolds", "Griffin", "Wallace", "Moreno",
    "West", "Cole", "Hayes", "Bryant", "Herrera", "Gibson", "Ellis", "Tran", "Medina", "Aguilar",
    "Stevens", "Murray", "Ford", "Castro", "Marshall", "Owens", "Harrison", "Fernandez",
    "McDonald", "Woods", "Washington", "Kennedy", "Wells", "Vargas", "Henry", "Chen", "Freeman",
    "Webb", "Tucker", "Guzman", "Burns", "Crawford", "Olson", "Simpson", "Porter", "Hunter",
)
_SURNAME_HEADS = ("Al", "Bran", "Cor", "Dor", "El", "Fen", "Gar", "Hol", "Is", "Jor", "Kel",
                  "Lor", "Mar", "Nor", "Os", "Pen", "Quin", "Ros", "Sel", "Tor", "Ul", "Val",
                  "Wen", "Yar", "Ab", "Ber", "Cul", "Dal")
_SURNAME_TAILS = ("dane", "wick", "ley", "ton", "more", "sby", "well", "stead", "mere",
                  "worth", "by", "ham", "hurst", "ford")


# Sentences that say nothing about anyone (the pronoun-style world's distance): no name, pronoun, value,
# capitalised word after the first or number, so no name part or value can occur in them.
FILLERS = (
    "The weather that season was mild and dry.",
    "Local markets sold fresh bread every morning.",
    "The trains ran on time most days.",
    "A new bridge was planned across the valley.",
    "Many shops closed early on quiet evenings.",
    "The museum added a hall for old maps.",
    "Rain fell often during the colder months.",
    "The library extended its opening hours.",
    "Most streets were lined with tall trees.",
    "The harbour was busy with small boats.",
    "A festival of music took place every summer.",
    "The price of coffee rose slowly over time.",
    "Several parks were cleaned by volunteers.",
    "The newspaper printed a weekly puzzle page.",
    "Buses connected the suburbs to the centre.",
    "The old theatre was painted a pale blue.",
    "Gardens in the area grew roses and herbs.",
    "A bakery on the corner opened at dawn.",
    "The river froze during one hard winter.",
    "Children played football in the square.",
    "The town hall clock was repaired twice.",
    "Fresh snow covered the hills for a week.",
    "The radio station played jazz at night.",
    "Cyclists crowded the paths on sunny days.",
)


def words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text))


class _NoOverlap:
    """Accepts strings greedily so that no accepted string contains another as a word n-gram.

    Why: `attribute_spans` finds a value by whole-word search; this guarantees a
    value cannot also match inside a name, another value or a template phrase.
    """

    def __init__(self) -> None:
        self._ngrams: set[tuple[str, ...]] = set()
        self._whole: set[tuple[str, ...]] = set()

    def add(self, text: str, *, force: bool = False) -> bool:
        ws = words(text)
        grams = {ws[i:j] for i in range(len(ws)) for j in range(i + 1, len(ws) + 1)}
        if not force and (ws in self._ngrams or grams & self._whole):
            return False
        self._ngrams |= grams
        self._whole.add(ws)
        return True


def _take(registry: _NoOverlap, candidates: Iterable[str], n: int, what: str) -> tuple[str, ...]:
    out = []
    for c in candidates:
        if len(out) == n:
            break
        if registry.add(c):
            out.append(c)
    if len(out) < n:
        raise ValueError(f"cannot make {n} distinct {what}; at most {len(out)} are available")
    return tuple(out)


def _shuffled(items: list[str], rng: np.random.Generator) -> list[str]:
    return [items[i] for i in rng.permutation(len(items))]


@functools.lru_cache(maxsize=16)
def pools(num_cities: int, num_universities: int, num_companies: int, num_majors: int,
          reserved: tuple[str, ...]) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...], tuple[str, ...],
                                               tuple[str, ...]]:
    """Value vocabularies (unranked) and name pools; fixed strings, independent of the seed.

    `reserved`: phrases registered first (the templates' literal text), so no value or name contains one."""
    rng = np.random.default_rng(_VOCAB_SEED)
    reg = _NoOverlap()
    for phrase in reserved:
        reg.add(phrase, force=True)
    majors = _take(reg, _MAJORS, num_majors, "majors")
    cities = _take(reg, _shuffled([h + t for h in _CITY_HEADS for t in _CITY_TAILS], rng),
                   num_cities, "cities")
    uni_words = _shuffled([h + t for h in _UNI_HEADS for t in _UNI_TAILS], rng)
    universities = _take(reg, (_UNI_FORMS[i % len(_UNI_FORMS)].format(w=w)
                               for i, w in enumerate(uni_words)), num_universities, "universities")
    company_words = _shuffled([h + t for h in _COMPANY_HEADS for t in _COMPANY_TAILS], rng)
    companies = _take(reg, (f"{w} {_COMPANY_SUFFIXES[i % len(_COMPANY_SUFFIXES)]}"
                            for i, w in enumerate(company_words)), num_companies, "companies")
    male = tuple(n for n in _MALE_FIRST if reg.add(n))
    female = tuple(n for n in _FEMALE_FIRST if reg.add(n))
    procedural = [h + t for h in _SURNAME_HEADS for t in _SURNAME_TAILS]
    surnames = tuple(n for n in list(_SURNAMES) + procedural if reg.add(n))
    vocab = {"birth_city": cities, "university": universities, "major": majors,
             "company": companies}
    return vocab, male, female, surnames
