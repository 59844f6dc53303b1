"""Write the sample pretraining corpus in data_dir/: bilingual (Chinese + English) text written by this project.

Nothing here comes from a third-party corpus. There are three kinds of lines:
* template lines filled by a seeded random generator: arithmetic, calendar dates (their weekdays and leap years
  are computed, so every fact is true), unit conversions, counting sequences and small market stories;
* word pairs, each line giving a word in both languages;
* short original prose paragraphs, in English and in Chinese, written for this project.

Almost every line is at least 20 tokens long with the baichuan tokenizer, so the DataEngine keeps it. The lines are
shuffled with a fixed seed and dealt into 8 shards (part-0000.txt ... part-0007.txt), so 1, 2, 4 or 8 ranks all get
whole shards of about the same size. The output is byte-for-byte the same on every run; `--check` confirms that the
committed files match this script.

Usage:
    python scripts/make_sample_data.py                 # (re)write data_dir/part-*.txt
    python scripts/make_sample_data.py --check         # exit 1 if data_dir differs from what the script writes
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from pathlib import Path
from common import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]

EN_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December"]
EN_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ZH_DAYS = ["一", "二", "三", "四", "五", "六", "日"]
NAMES = [("Anna", "安娜"), ("Ben", "本"), ("Chen Wei", "陈伟"), ("Li Na", "李娜"), ("Omar", "奥马尔"),
         ("Sofia", "索菲亚"), ("Wang Fang", "王芳"), ("Zhang Lei", "张磊"), ("Maya", "玛雅"), ("Tom", "汤姆")]
FRUITS = [("apples", "苹果"), ("pears", "梨"), ("oranges", "橙子"), ("peaches", "桃子"), ("plums", "李子"),
          ("lemons", "柠檬"), ("mangoes", "芒果"), ("apricots", "杏")]
COLORS = [("red", "红色的"), ("green", "绿色的"), ("blue", "蓝色的"), ("yellow", "黄色的"), ("brown", "棕色的"),
          ("white", "白色的")]
WORDS = [("river", "河流"), ("mountain", "山"), ("library", "图书馆"), ("teacher", "老师"), ("window", "窗户"),
         ("bridge", "桥"), ("garden", "花园"), ("kitchen", "厨房"), ("winter", "冬天"), ("summer", "夏天"),
         ("morning", "早晨"), ("evening", "傍晚"), ("train station", "火车站"), ("notebook", "笔记本"),
         ("umbrella", "雨伞"), ("bicycle", "自行车"), ("lighthouse", "灯塔"), ("harbour", "港口"), ("forest", "森林"),
         ("friend", "朋友"), ("market", "市场"), ("letter", "信"), ("clock", "钟"), ("island", "岛"), ("cloud", "云")]

EN_PROSE = [
    "The lighthouse on the northern cape was kept by an old man who wrote down the weather every evening. He "
    "never missed a day in thirty years, and when he finally retired, the notebooks filled a whole shelf of the "
    "village library, where children still read them to learn how the wind changes before a storm.",
    "Bread is patient work. The flour and water are mixed in the evening, the dough rests through the night, and in "
    "the morning it is folded, shaped and left to rise again. Only then does it go into the hot oven, where the "
    "crust turns brown and the kitchen fills with a smell that wakes the whole house.",
    "A river does not hurry and does not stop. In spring it carries melted snow from the mountains, in summer it "
    "grows slow and warm, in autumn it is full of fallen leaves, and in winter the edges freeze while the middle "
    "keeps moving, quietly, toward the sea.",
    "When the school built its first small observatory, the students took turns staying late to look at the moon. "
    "They drew its craters by hand, compared their drawings the next morning, and slowly learned that careful "
    "looking is the beginning of every science.",
    "The night train left the station at ten minutes past nine. Most passengers fell asleep before the first "
    "tunnel, but a girl by the window stayed awake, counting the lights of the towns they passed and guessing "
    "which of them had a bakery that would open before dawn.",
    "Counting is older than writing. Shepherds once kept a pebble for every sheep that went out to the field, and "
    "in the evening they moved one pebble back for every sheep that returned. If a pebble was left over, they knew "
    "that someone was still lost on the hill.",
    "In the small garden behind the house there were beans along the fence, tomatoes near the wall and a row of "
    "sunflowers that grew taller than the children. Every evening someone carried water from the well, and every "
    "week the family ate something that they had grown themselves.",
    "A good map leaves things out. It shows the roads, the rivers and the names of towns, but not every tree and "
    "every stone, because a map that showed everything would be as large as the land itself and just as hard to "
    "carry in a pocket.",
    "The harbour was quiet at noon. The fishing boats had come back early, the nets were drying on the stones, and "
    "the gulls walked along the pier as if they owned it, waiting for someone to drop a piece of bread.",
    "Learning a second language feels like walking through a familiar house in the dark. You know where the rooms "
    "are, but you bump into furniture, and only after many evenings do you find the light switches by memory.",
    "The clock in the town square was always four minutes slow, and everyone knew it. People simply added four "
    "minutes in their heads, and when a new mayor finally had it repaired, half the town missed the morning bus "
    "for a week.",
    "Tea is served differently in every house. Some people boil the water twice, some warm the cups first, some "
    "add milk and some would never dream of it, but everyone agrees that tea tastes best when it is shared with a "
    "friend on a cold afternoon.",
]

ZH_PROSE = [
    "北方海角上的灯塔由一位老人看守。三十年来，他每天傍晚都把天气记在本子上，从来没有漏过一天。他退休以后，这些"
    "笔记本摆满了村图书馆的一整层书架，孩子们至今还在读，从中学会在暴风雨来临之前风是怎样变化的。",
    "做面包需要耐心。傍晚把面粉和水揉在一起，让面团静静地放一夜，第二天早上再折叠、整形，等它再次发起来，才放进"
    "热烘烘的烤炉。面包皮慢慢变成金黄色，厨房里的香味把全家人都叫醒了。",
    "河流从不着急，也从不停下。春天，它带着山上融化的雪水；夏天，它变得缓慢而温暖；秋天，水面上漂满落叶；冬天，"
    "岸边结了冰，河心却依然安静地流向大海。",
    "学校建起第一座小天文台以后，同学们轮流留下来观察月亮。他们用手画出月面上的环形山，第二天早上互相比较，慢慢"
    "明白了仔细观察是一切科学的开始。",
    "夜班火车九点十分离开车站。大多数乘客在进入第一个隧道之前就睡着了，只有靠窗的一个女孩一直醒着，数着经过的"
    "城镇灯火，猜想哪一个小镇有天亮以前就开门的面包店。",
    "计数比文字还要古老。从前的牧羊人每放一只羊出去吃草，就留下一颗小石子；傍晚每回来一只羊，就拿走一颗。如果"
    "最后还剩下石子，他们就知道还有羊迷失在山坡上。",
    "房子后面的小花园里，篱笆边种着豆子，墙根下种着西红柿，还有一排向日葵长得比孩子们还高。每天傍晚都有人从井里"
    "打水浇地，每个星期全家都能吃到自己种的东西。",
    "一张好地图懂得省略。它画出道路、河流和城镇的名字，却不画出每一棵树、每一块石头，因为把一切都画出来的地图会"
    "和大地一样大，也一样没法放进口袋里。",
    "中午的港口很安静。渔船早早回来了，渔网摊在石头上晾晒，海鸥在码头上走来走去，好像这里是它们的家，等着有人"
    "掉下一块面包。",
    "学习第二种语言，就像在黑暗中走过一座熟悉的房子。你知道每个房间在哪里，却总是撞到家具，要过很多个晚上，才能"
    "凭记忆摸到电灯开关。",
    "镇中心广场上的钟总是慢四分钟，大家都知道。人们只是在心里加上四分钟。新镇长终于把钟修好以后，半个镇子的人"
    "一连一个星期都没赶上早班车。",
    "每家人泡茶的方法都不一样。有人把水烧开两次，有人先把杯子烫热，有人加牛奶，有人绝不会这样做。但大家都同意，"
    "寒冷的下午和朋友一起喝的茶最好喝。",
]


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def arithmetic(rng: random.Random) -> list:
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 12)
    s = a + b
    return [f"Adding {a} and {b} gives {s}; taking {b} away from {s} leaves {a} again, and {a} times {c} is {a * c}.",
            f"{a}加{b}等于{s}，{s}减去{b}又得到{a}，而{a}乘以{c}等于{a * c}。"]


def dates(rng: random.Random) -> list:
    day = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 100))
    later = day + dt.timedelta(days=7)
    wd, leap = day.weekday(), _is_leap(day.year)
    return [f"{EN_MONTHS[day.month - 1]} {day.day}, {day.year} was a {EN_DAYS[wd]}. One week later, on "
            f"{EN_MONTHS[later.month - 1]} {later.day}, {later.year}, it was a {EN_DAYS[wd]} again, and {day.year} "
            f"{'was' if leap else 'was not'} a leap year, with {366 if leap else 365} days.",
            f"{day.year}年{day.month}月{day.day}日是星期{ZH_DAYS[wd]}。一个星期以后，也就是{later.year}年{later.month}月"
            f"{later.day}日，又是星期{ZH_DAYS[wd]}。{day.year}年{'是' if leap else '不是'}闰年，全年共有"
            f"{366 if leap else 365}天。"]


def units(rng: random.Random) -> list:
    h, km = rng.randint(2, 48), rng.randint(2, 90)
    return [f"There are {h * 60} minutes in {h} hours, because every hour has sixty minutes, and the same {h} hours "
            f"hold {h * 3600} seconds.",
            f"{h}个小时等于{h * 60}分钟，因为每个小时有六十分钟；这{h}个小时也等于{h * 3600}秒。",
            f"A distance of {km} kilometres is {km * 1000} metres, and walking it at five kilometres an hour takes "
            f"about {km / 5:g} hours.",
            f"{km}公里等于{km * 1000}米，如果每小时走五公里，走完这段路大约需要{km / 5:g}个小时。"]


def sequence(rng: random.Random) -> list:
    start, step = rng.randint(1, 60), rng.randint(2, 15)
    seq = [start + k * step for k in range(6)]
    shown = ", ".join(map(str, seq))
    return [f"Counting up by {step} from {start} gives {shown}, so the next number in the sequence is "
            f"{seq[-1] + step}.",
            f"从{start}开始每次加{step}，依次得到{'、'.join(map(str, seq))}，所以下一个数是{seq[-1] + step}。"]


def market(rng: random.Random) -> list:
    (en1, zh1), (en2, zh2) = rng.sample(NAMES, 2)
    fruit_en, fruit_zh = rng.choice(FRUITS)
    color_en, color_zh = rng.choice(COLORS)
    wd = rng.randrange(7)
    n = rng.randint(6, 40)
    k = rng.randint(1, n - 1)
    return [f"On {EN_DAYS[wd]} morning {en1} bought {n} {fruit_en} at the market, gave {k} of them to {en2}, and "
            f"carried the remaining {n - k} home in a {color_en} basket.",
            f"星期{ZH_DAYS[wd]}早上，{zh1}在市场上买了{n}个{fruit_zh}，送给{zh2}{k}个，把剩下的{n - k}个放进一个"
            f"{color_zh}篮子里带回了家。"]


def word_pair(rng: random.Random) -> list:
    en, zh = rng.choice(WORDS)
    return [f"The Chinese word for \"{en}\" is {zh}, and in English {zh} is called \"{en}\"; both name the same "
            f"thing in two languages. 中文的“{zh}”在英语里叫作“{en}”。"]


GENERATORS = [arithmetic, dates, units, sequence, market, word_pair]


def build_lines(seed: int, rounds: int) -> list:
    rng = random.Random(seed)
    lines = list(EN_PROSE) + list(ZH_PROSE)
    for _ in range(rounds):
        for gen in GENERATORS:
            lines.extend(gen(rng))
    rng.shuffle(lines)
    return lines


def shard_texts(seed: int, rounds: int, shards: int) -> dict:
    lines = build_lines(seed, rounds)
    return {f"part-{s:04d}.txt": "".join(line + "\n" for line in lines[s::shards]) for s in range(shards)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "data_dir", help="folder to write the shards into")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the template generator and the shuffle")
    parser.add_argument("--rounds", type=int, default=200,
                        help="how many times each template family is drawn (each draw gives 1 to 4 lines)")
    parser.add_argument("--shards", type=int, default=8, help="number of part-*.txt files (a multiple of the ranks)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --output instead of writing")
    args = parser.parse_args(argv)

    texts = shard_texts(args.seed, args.rounds, args.shards)
    if args.check:
        existing = sorted(p.name for p in args.output.glob("part-*.txt"))
        differ = [name for name, text in texts.items()
                  if not (args.output / name).is_file() or (args.output / name).read_bytes() != text.encode("utf-8")]
        extra = sorted(set(existing) - set(texts))
        if differ or extra:
            print(f"{args.output} differs from the generator: changed/missing {differ}, unexpected {extra}",
                  file=sys.stderr)
            return 1
        print(f"{args.output}: {len(texts)} shards match the generator")
        return 0

    args.output.mkdir(parents=True, exist_ok=True)
    for stale in args.output.glob("part-*.txt"):
        if stale.name not in texts:
            stale.unlink()
    total = 0
    for name, text in texts.items():
        data = text.encode("utf-8")
        (args.output / name).write_bytes(data)
        total += len(data)
    print(f"wrote {len(texts)} shards, {sum(t.count(chr(10)) for t in texts.values())} lines, {total} bytes "
          f"to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
