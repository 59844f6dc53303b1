"""Subject metadata of the five benchmarks, as small published facts kept with the code.

* MMLU: ``MMLU_SUBCATEGORIES`` (57 subjects -> 17 subcategories) and ``MMLU_CATEGORIES`` (4 groups ->
  subcategories), the two dicts of hendrycks/test ``categories.py``, which the reference
  ``evaluate_mmlu.py`` imported without shipping.
* C-Eval: ``CEVAL_SUBJECTS`` (52 subjects -> English name, Chinese name, category), hkust-nlp/ceval
  ``subject_mapping.json``; ``CEVAL_PROMPT_NAMES``, the Chinese names the reference ``evaluate_zh.py`` puts
  in its prompt (one differs from the mapping); ``CEVAL_HARD``, the 8 subjects of C-Eval Hard
  (hkust-nlp/ceval README, "C-Eval Hard Leaderboard").
* CMMLU: ``CMMLU_NAMES`` / ``CMMLU_SUBCATEGORIES`` / ``CMMLU_CATEGORIES``, haonan-li/CMMLU ``src/categories.py``.
* GAOKAO-Bench and AGIEval: the files kept (single-answer, four-option questions) and the name put in the
  prompt; see ``evaluation/data.py`` for why the others are left out.

tests/test_evaluation_data.py checks these against the copies that ship with the data
(``mmlu/categories.json``, ``ceval/subject_mapping.json``, ``cmmlu/categories.json``) and the file lists.
"""

# ---------------------------------------------------------------------------------------------------
# MMLU (hendrycks/test categories.py)
# ---------------------------------------------------------------------------------------------------
MMLU_SUBCATEGORIES = {
    "abstract_algebra": ["math"],
    "anatomy": ["health"],
    "astronomy": ["physics"],
    "business_ethics": ["business"],
    "clinical_knowledge": ["health"],
    "college_biology": ["biology"],
    "college_chemistry": ["chemistry"],
    "college_computer_science": ["computer science"],
    "college_mathematics": ["math"],
    "college_medicine": ["health"],
    "college_physics": ["physics"],
    "computer_security": ["computer science"],
    "conceptual_physics": ["physics"],
    "econometrics": ["economics"],
    "electrical_engineering": ["engineering"],
    "elementary_mathematics": ["math"],
    "formal_logic": ["philosophy"],
    "global_facts": ["other"],
    "high_school_biology": ["biology"],
    "high_school_chemistry": ["chemistry"],
    "high_school_computer_science": ["computer science"],
    "high_school_european_history": ["history"],
    "high_school_geography": ["geography"],
    "high_school_government_and_politics": ["politics"],
    "high_school_macroeconomics": ["economics"],
    "high_school_mathematics": ["math"],
    "high_school_microeconomics": ["economics"],
    "high_school_physics": ["physics"],
    "high_school_psychology": ["psychology"],
    "high_school_statistics": ["math"],
    "high_school_us_history": ["history"],
    "high_school_world_history": ["history"],
    "human_aging": ["health"],
    "human_sexuality": ["culture"],
    "international_law": ["law"],
    "jurisprudence": ["law"],
    "logical_fallacies": ["philosophy"],
    "machine_learning": ["computer science"],
    "management": ["business"],
    "marketing": ["business"],
    "medical_genetics": ["health"],
    "miscellaneous": ["other"],
    "moral_disputes": ["philosophy"],
    "moral_scenarios": ["philosophy"],
    "nutrition": ["health"],
    "philosophy": ["philosophy"],
    "prehistory": ["history"],
    "professional_accounting": ["other"],
    "professional_law": ["law"],
    "professional_medicine": ["health"],
    "professional_psychology": ["psychology"],
    "public_relations": ["politics"],
    "security_studies": ["politics"],
    "sociology": ["culture"],
    "us_foreign_policy": ["politics"],
    "virology": ["health"],
    "world_religions": ["philosophy"],
}

MMLU_CATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering"],
    "humanities": ["history", "philosophy", "law"],
    "social sciences": ["politics", "culture", "economics", "geography", "psychology"],
    "other (business, health, misc.)": ["other", "business", "health"],
}

# The column names of the baichuan-7B README table, for the one-line summary.
MMLU_TABLE_COLUMNS = {
    "Humanities": "humanities",
    "Social Sciences": "social sciences",
    "STEM": "STEM",
    "Other": "other (business, health, misc.)",
}

# ---------------------------------------------------------------------------------------------------
# C-Eval (hkust-nlp/ceval subject_mapping.json): subject -> (English name, Chinese name, category)
# ---------------------------------------------------------------------------------------------------
CEVAL_SUBJECTS = {
    "computer_network": ("Computer Network", "计算机网络", "STEM"),
    "operating_system": ("Operating System", "操作系统", "STEM"),
    "computer_architecture": ("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": ("College Programming", "大学编程", "STEM"),
    "college_physics": ("College Physics", "大学物理", "STEM"),
    "college_chemistry": ("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": ("Probability and Statistics", "概率统计", "STEM"),
    "discrete_mathematics": ("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": ("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": ("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": ("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": ("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": ("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": ("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": ("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": ("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": ("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": ("College Economics", "大学经济学", "Social Science"),
    "business_administration": ("Business Administration", "工商管理", "Social Science"),
    "marxism": ("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("Education Science", "教育学", "Social Science"),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science"),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science"),
    "middle_school_politics": ("Middle School Politics", "初中政治", "Social Science"),
    "middle_school_geography": ("Middle School Geography", "初中地理", "Social Science"),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("Ideological and Moral Cultivation", "思想道德修养与法律基础", "Humanities"),
    "logic": ("Logic", "逻辑学", "Humanities"),
    "law": ("Law", "法学", "Humanities"),
    "chinese_language_and_literature": ("Chinese Language and Literature", "中国语言文学", "Humanities"),
    "art_studies": ("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": ("Professional Tour Guide", "导游资格", "Humanities"),
    "legal_professional": ("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": ("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": ("High School History", "高中历史", "Humanities"),
    "middle_school_history": ("Middle School History", "初中历史", "Humanities"),
    "civil_servant": ("Civil Servant", "公务员", "Other"),
    "sports_science": ("Sports Science", "体育学", "Other"),
    "plant_protection": ("Plant Protection", "植物保护", "Other"),
    "basic_medicine": ("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": ("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": ("Urban and Rural Planner", "注册城乡规划师", "Other"),
    "accountant": ("Accountant", "注册会计师", "Other"),
    "fire_engineer": ("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("Environmental Impact Assessment Engineer", "环境影响评价工程师", "Other"),
    "tax_accountant": ("Tax Accountant", "税务师", "Other"),
    "physician": ("Physician", "医师资格", "Other"),
}

# The reference evaluate_zh.py (TASK2DESC) names every subject as subject_mapping.json does except this one;
# the prompt keeps the reference's wording so that published scores are reproduced.
CEVAL_PROMPT_NAMES = {
    subject: names[1] for subject, names in CEVAL_SUBJECTS.items()
}
CEVAL_PROMPT_NAMES["mao_zedong_thought"] = "毛泽东思想和中国特色社会主义理论概论"

CEVAL_CATEGORY_ORDER = ("STEM", "Social Science", "Humanities", "Other")

CEVAL_HARD = (
    "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
    "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics",
)

# ---------------------------------------------------------------------------------------------------
# CMMLU (haonan-li/CMMLU src/categories.py)
# ---------------------------------------------------------------------------------------------------
CMMLU_NAMES = {
    "agronomy": "农学",
    "anatomy": "解剖学",
    "ancient_chinese": "古汉语",
    "arts": "艺术学",
    "astronomy": "天文学",
    "business_ethics": "商业伦理",
    "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策",
    "chinese_history": "中国历史",
    "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格",
    "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学",
    "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学",
    "college_law": "大学法律",
    "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学",
    "computer_science": "计算机科学",
    "computer_security": "计算机安全",
    "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理",
    "economics": "经济学",
    "education": "教育学",
    "electrical_engineering": "电气工程",
    "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学",
    "ethnology": "民族学",
    "food_science": "食品科学",
    "genetics": "遗传学",
    "global_facts": "全球事实",
    "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治",
    "human_sexuality": "人类性行为",
    "international_law": "国际法学",
    "journalism": "新闻学",
    "jurisprudence": "法理学",
    "legal_and_moral_basis": "法律与道德基础",
    "logical": "逻辑学",
    "machine_learning": "机器学习",
    "management": "管理学",
    "marketing": "市场营销",
    "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语",
    "nutrition": "营养学",
    "philosophy": "哲学",
    "professional_accounting": "专业会计",
    "professional_law": "专业法学",
    "professional_medicine": "专业医学",
    "professional_psychology": "专业心理学",
    "public_relations": "公共关系",
    "security_study": "安全研究",
    "sociology": "社会学",
    "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
    "world_history": "世界历史",
    "world_religions": "世界宗教",
}

CMMLU_SUBCATEGORIES = {
    "agronomy": ["other"],
    "anatomy": ["biology"],
    "ancient_chinese": ["linguistics", "china specific"],
    "arts": ["arts"],
    "astronomy": ["physics"],
    "business_ethics": ["business"],
    "chinese_civil_service_exam": ["politics", "china specific"],
    "chinese_driving_rule": ["other", "china specific"],
    "chinese_food_culture": ["culture", "china specific"],
    "chinese_foreign_policy": ["politics", "china specific"],
    "chinese_history": ["history", "china specific"],
    "chinese_literature": ["literature", "china specific"],
    "chinese_teacher_qualification": ["education", "china specific"],
    "college_actuarial_science": ["math"],
    "college_education": ["education"],
    "college_engineering_hydrology": ["engineering"],
    "college_law": ["law"],
    "college_mathematics": ["math"],
    "college_medical_statistics": ["statistics"],
    "clinical_knowledge": ["other"],
    "college_medicine": ["other"],
    "computer_security": ["other"],
    "conceptual_physics": ["physics"],
    "construction_project_management": ["other", "china specific"],
    "economics": ["economics"],
    "education": ["education"],
    "elementary_chinese": ["linguistics", "china specific"],
    "elementary_commonsense": ["other", "china specific"],
    "elementary_information_and_technology": ["other"],
    "electrical_engineering": ["engineering"],
    "elementary_mathematics": ["math"],
    "ethnology": ["culture", "china specific"],
    "food_science": ["other"],
    "genetics": ["biology"],
    "global_facts": ["global"],
    "high_school_biology": ["biology"],
    "high_school_chemistry": ["chemistry"],
    "computer_science": ["computer science"],
    "high_school_geography": ["geography"],
    "high_school_mathematics": ["math"],
    "high_school_physics": ["physics"],
    "high_school_politics": ["politics", "china specific"],
    "human_sexuality": ["other"],
    "international_law": ["law"],
    "journalism": ["sociology"],
    "jurisprudence": ["law"],
    "legal_and_moral_basis": ["other"],
    "logical": ["philosophy"],
    "machine_learning": ["computer science"],
    "management": ["business"],
    "marketing": ["business"],
    "marxist_theory": ["philosophy"],
    "modern_chinese": ["linguistics", "china specific"],
    "nutrition": ["other"],
    "philosophy": ["philosophy"],
    "professional_accounting": ["business"],
    "professional_law": ["law"],
    "professional_medicine": ["other"],
    "professional_psychology": ["psychology"],
    "public_relations": ["politics"],
    "security_study": ["politics"],
    "sociology": ["culture"],
    "sports_science": ["other"],
    "traditional_chinese_medicine": ["other", "china specific"],
    "virology": ["biology"],
    "world_history": ["history"],
    "world_religions": ["global"],
}

CMMLU_CATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"],
    "Humanities": ["history", "philosophy", "law", "arts", "literature", "global"],
    "Social Science": ["linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                       "education", "sociology"],
    "Other": ["other"],
    "China specific": ["china specific"],
}

# ---------------------------------------------------------------------------------------------------
# GAOKAO-Bench (Objective_Questions/<file>.json): the files whose items are single four-option questions,
# with the exam name used in the prompt. Both maths papers are named alike on purpose: the file names
# only say "I" and "II".
# ---------------------------------------------------------------------------------------------------
GAOKAO_SUBJECTS = {
    "2010-2013_English_MCQs": "高考英语",
    "2010-2022_Biology_MCQs": "高考生物",
    "2010-2022_Chemistry_MCQs": "高考化学",
    "2010-2022_Chinese_Lang_and_Usage_MCQs": "高考语文",
    "2010-2022_History_MCQs": "高考历史",
    "2010-2022_Math_I_MCQs": "高考数学",
    "2010-2022_Math_II_MCQs": "高考数学",
    "2010-2022_Physics_MCQs": "高考物理",
    "2010-2022_Political_Science_MCQs": "高考政治",
}
# Files left out: each item bundles several sub-questions (one answer letter per blank or per question),
# which a single next-token choice cannot answer.
GAOKAO_EXCLUDED = (
    "2010-2022_Chinese_Modern_Lit", "2010-2022_English_Fill_in_Blanks", "2010-2022_English_Reading_Comp",
    "2010-2022_Geography_MCQs", "2012-2022_English_Cloze_Test",
)

# ---------------------------------------------------------------------------------------------------
# AGIEval v1 (v1/<task>.jsonl): the four-option tasks. Chinese tasks take the C-Eval prompt with the
# exam name below; English tasks take the MMLU prompt with these subject words.
# ---------------------------------------------------------------------------------------------------
AGIEVAL_ZH_SUBJECTS = {
    "gaokao-biology": "高考生物",
    "gaokao-chemistry": "高考化学",
    "gaokao-chinese": "高考语文",
    "gaokao-english": "高考英语",
    "gaokao-geography": "高考地理",
    "gaokao-history": "高考历史",
    "gaokao-mathqa": "高考数学",
    "gaokao-physics": "高考物理",
    "jec-qa-ca": "国家司法考试案例分析",
    "jec-qa-kd": "国家司法考试知识",
    "logiqa-zh": "逻辑推理",
}
AGIEVAL_EN_SUBJECTS = {
    "logiqa-en": "logical_reasoning",
    "sat-en": "SAT_English",
    "sat-en-without-passage": "SAT_English",
    "sat-math": "SAT_math",
}
# Left out: five options (aqua-rat, lsat-*) or no options at all (math, gaokao-mathcloze).
AGIEVAL_EXCLUDED = ("aqua-rat", "lsat-ar", "lsat-lr", "lsat-rc", "math", "gaokao-mathcloze")
