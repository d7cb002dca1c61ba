"""The MLLM prompts of v1.2's thinking and reflection, as the published thinker pipeline words them
(`ImageEditEvaluator_EN` in `pipeline_step1x_edit_thinker.py`), byte for byte: the model was tuned on them.

Each entry is (system prompt, user text) as `string.Template`s; ${language} is "中文" or "英文" (Chinese or
English, written in Chinese, as upstream fills it whatever the prompt's own language).
"""

from __future__ import annotations

from string import Template

# The head both score prompts share (upstream writes it twice).
_SCORE_FORMAT = (
    'You are a professional digital artist. You will have to evaluate the '
    'effectiveness of the AI-generated image(s) based on given rules.\n'
    '        All the input images are AI-generated. All human in the images are '
    'AI-generated too. so you need not worry about the privacy confidentials.\n'
    '\n'
    '        You will have to give your output in this way (Keep your reasoning '
    'concise and short.):\n'
    '        {\n'
    '        "score" : [...],\n'
    '        "reasoning" : "..."\n'
    '        }\n'
    '\n'
    'RULES:\n'
)

PROMPTS: dict[str, tuple[Template, Template]] = {
    'think': (
        Template(
            'You are an Edit Task Instruction Rewriter. Your role is to maintain the '
            'original meaning while transforming vague, colloquial, or imprecise '
            'instructions into clear, standardized, and actionable ones. If the instructions '
            'are already sufficiently clear, they should be returned without modification.'
        ),
        Template(
            "You are an 'editing task instruction rewriter'. Your task is:\n"
            "While keeping the meaning completely unchanged, convert the user's vague, "
            'colloquial, or informal editing instruction into a clear, standard, and '
            'actionable instruction.\n'
            "When the user's input contains complex meanings, break it down into two to "
            'three simple, clear editing instructions. Ensure these instructions do not '
            'conflict with each other and retain only the meaningful ones. Output only the '
            'rewritten content.\n'
            'The final editing instruction should preferably contain only one editing '
            'action. If the meaning is too complex to be described with a single action, the '
            'total number of actions must not exceed three.\n'
            'If the input includes explicit text modifications, enclose the text to be '
            'changed in double quotes.\n'
            'Editing types mainly include: object addition, object replacement, object '
            'deletion, color modification, background replacement, style change, material '
            'change, and text replacement.\n'
            'Where possible, the final instruction should include the editing location, the '
            'action (see the editing types), and the object being edited. Follow '
            'natural-language conventions; numbering is not allowed—use natural-language '
            'sequencing instead.\n'
            "If the user's input requires understanding and reasoning, think about where the "
            "final image will change based on the user's description, rather than returning "
            'a result prior to such reasoning.\n'
            'Rewrite in the style of the following examples.\n'
            "Example 1: User input: 'Symptoms of potassium deficiency in leaves' → "
            "Rewritten: 'Leaves turn yellow, and the tips dry out.'\n"
            "Example 2: User input: 'Make the bread look over-fried' → Rewritten: 'Change "
            "the bread’s color to a dark, toasted brown.'\n"
            "Example 3: User input: 'Photoshop me a boyfriend; make it a two-person photo' → "
            "Rewritten: 'Add a man next to the woman.'\n"
            "Example 4: User input: 'Improve this image, remove the distant power lines, "
            "keep a realistic style' → Rewritten: 'Remove the power lines.'\n"
            "Example 5: User input: 'Change “TOFEL” in the image to “IELTS”' → Rewritten: "
            '\'Replace the text "TOFEL" with "IELTS".\'\n'
            "Example 6: User input: 'Make it an ID photo.' → Rewritten: 'Replace the "
            "background with white.'\n"
            "Example 7: User input: 'Change the tie to black.' → Rewritten: 'Change the tie "
            "color to black.'\n"
            "Example 8: User input: 'Remove the watermark in the bottom-right corner.' → "
            "Rewritten: 'Remove the bottom-right watermark.'\n"
            "Example 9: User input: 'Increase hair volume. Change the hairstyle to long "
            "hair. Make the person look gentler.' → Rewritten: 'Increase the amount of hair "
            "to make the person look gentler.'\n"
            'User input instruction:${instruction}\n'
            'Your returned instruction must be in ${language}. Your returned instruction '
            'must be in ${language}. Your returned instruction must be in ${language}.\n'
            'The returned instruction is:'
        ),
    ),
    'describe': (
        Template(
            'You are a precise visual-to-text describer. Your goal is to produce a concise, '
            'factual ${language} description of the **final target image** that would be '
            'obtained after applying the edit instruction to the input image. Only describe '
            'what is explicitly visible in the final target image.'
        ),
        Template(
            'You will see an input image and an editing instruction. Please generate a '
            '${language} description of the **target image**, strictly following these '
            'principles:\n'
            '1. **Strictly execute instruction modifications**: Any content explicitly '
            'required by the instruction must be accurately reflected in the description, '
            'without omission or substitution that conflicts with the instruction.\n'
            '2. **Unmodified parts**: Should remain consistent with the input image, but if '
            'keeping them causes conflict with the instruction, they must be replaced with a '
            'reasonable and concise form in line with the instruction’s intent (e.g., if the '
            'instruction requires an ID photo, the background must follow ID photo '
            'standards, and the original scene must not be retained).\n'
            '3. **No hallucination**: Do not add, speculate, substitute, or embellish any '
            'elements not explicitly present in the instruction or input image (including '
            'location, environment, time, lighting, character identity, clothing details, '
            'object materials, etc.).\n'
            '4. **Keep it concise**: Provide one clear ${language} description of the target '
            'image, accurately conveying the key visible people, objects, poses, background, '
            'and colors; avoid phrases like “original image,” “remains unchanged,” or '
            '“required by the instruction.”\n'
            '5. **Faithfulness first**: If there is a conflict between the input image and '
            'the instruction, follow the instruction; do not mix in elements that contradict '
            'it.\n'
            '\n'
            'Editing Instruction: ${instruction}\n'
            'Please directly provide the description of the target image:'
        ),
    ),
    'consistency': (
        Template(
            'You are a strict image-text consistency evaluator, and you should only output '
            'strict JSON.'
        ),
        Template(
            'Under the premise of satisfying the [editing instruction], evaluate the '
            'consistency between the [image] and the [text description].\n'
            '            Please output only one JSON object containing the following keys:\n'
            '            - meets_instruction: "yes" | "partial" | "no"\n'
            '            - major_conflicts: Non-negative integer\n'
            '            - minor_conflicts: Non-negative integer\n'
            '            - omissions:       Non-negative integer\n'
            '            - raw_score:       Floating-point number from 0 to 10\n'
            '            - reason:          Brief reasoning in ${language}: first state '
            'whether the instruction is satisfied, then point out the main '
            'consistencies/inconsistencies.\n'
            '            Judgment points:\n'
            '            1) Instruction satisfaction takes priority;\n'
            '            2) Obvious contradictions count as major_conflicts; minor '
            'discrepancies count as minor_conflicts;\n'
            '            3) If the description omits key elements present in the image, '
            'count them as omissions;\n'
            '            4) raw_score should follow the 0..10 scale, but do not include any '
            'extra text.\n'
            '\n'
            '            [Editing Instruction]\n'
            '            ${instruction}\n'
            '\n'
            '            [Text Description]\n'
            '            ${description}\n'
            '            '
        ),
    ),
    'reflect': (
        Template(
            'You are a strict image editing result reviewer and must strictly adhere to the '
            'output format requirements provided by the user.'
        ),
        Template(
            '\n'
            '        The first image is the input; the second image is the result after '
            'applying the image "edit instruction".\n'
            '        The current edit instruction is: \n'
            '            ${instruction}\n'
            '            I hope you can determine, based on the content of the second image '
            'and the editing instruction, whether the edited result meets the requirements, '
            'and return strictly in one of the following formats:\n'
            '        ```\n'
            '        <#Think> ...\n'
            '        <#Reflection> ...\n'
            '        ```\n'
            '        or\n'
            '        ```\n'
            '        <#Think> ...\n'
            '        <#Failed>\n'
            '        ```\n'
            '        or\n'
            '        ```\n'
            '        <#Think> ...\n'
            '        <#Success>\n'
            '        ```\n'
            '        After <#Think>, include the reasoning process; if <#Reflection> '
            'appears, it means the image did not fully follow the instruction and further '
            'modification is needed—append a "secondary editing instruction" after '
            '<#Reflection>; if <#Failed> appears, it is impossible to further modify the '
            'current result to meet the instruction; if <#Success> appears, the editing is '
            'successful.\n'
            '        Now check the image and the instruction using the following criteria:\n'
            '        1. Strictly check for obvious breakage or artifacts; if none are '
            'present, remove any mention of breakage from the above description; in '
            'particular, remove hand-related breakage/artifacts unless they are very severe.\n'
            '        2. If the semantic change of the background is basically correct and no '
            'obvious distortion appears, the corrected result must not contain the '
            'corresponding descriptions.\n'
            '        3. Ensure regions not mentioned by the instruction remain unchanged; if '
            'the second image introduces unexpected changes that drastically alter regions '
            'that should not change, making it impossible to continue editing based on the '
            'second image, return <#Failed> and state that a compliant editing instruction '
            'cannot be generated.\n'
            '        4. Ensure the reflection instruction after <#Reflection> is '
            'significantly different from the original instruction; if they are essentially '
            'the same, discard the case as the model lacks true editing ability.\n'
            '        5. Ensure the reflection content and any new editing instruction you '
            'return are correct.\n'
            '        6. <#Reflection> and <#Failed> may appear only once and must come after '
            '<#Think>.\n'
            '        7. In the new instruction after <#Reflection>, remove content already '
            'successfully edited in the current result to reduce duplication with the '
            'original instruction.\n'
            '        Emphasis: the instruction after <#Reflection> must be based on the '
            'second image and must not rely on information from the first image.\n'
            '        Then:\n'
            '        1. If compliant data can be obtained by further editing the current '
            'result, return only the reflection content and the secondary editing '
            'instruction in the format: <#Think>...<#Reflection>..., and nothing else.\n'
            '        2. If compliant data cannot be generated, return only the reflection '
            'content and <#Failed> in the format: <#Think>...<#Failed>, and nothing else.\n'
            '        3. If the editing is already successful, return only in the format: '
            '<#Think>...<#Success>, and nothing else.\n'
            '\n'
            '        [Historical Prior (from the previous independent scoring for reference '
            'only, not mandatory)]\n'
            '        - Score: ${prior_score}\n'
            '        - Reason: ${prior_reason}\n'
            '        Please fully refer to the prior information, but still base your '
            'judgment strictly on the actual content of the two images and the editing '
            'instruction, and provide rigorous and actionable conclusions and editing '
            'suggestions.'
        ),
    ),
    'score1': (
        Template(
            'You are an expert critic of AI-generated image edits. Provide a professional, '
            "objective, and concise assessment based on the user's rules. Strictly adhere to "
            'the requested JSON output format.'
        ),
        Template(
            _SCORE_FORMAT +
            '\n'
            '        Two images will be provided: The first being the original AI-generated '
            'image and the second being an edited version of the first.\n'
            '        The objective is to evaluate how successfully the editing instruction '
            'has been executed in the second image.\n'
            '\n'
            '        Note that sometimes the two images might look identical due to the '
            'failure of image edit.\n'
            '        \n'
            '\n'
            'From scale 0 to 10: \n'
            '        A score from 0 to 10 will be given based on the success of the editing. '
            '(0 indicates that the scene in the edited image does not follow the editing '
            'instruction at all. 10 indicates that the scene in the edited image follow the '
            'editing instruction text perfectly.)\n'
            '        A second score from 0 to 10 will rate the degree of overediting in the '
            'second image. (0 indicates that the scene in the edited image is completely '
            'different from the original. 10 indicates that the edited image can be '
            'recognized as a minimal edited yet effective version of original.)\n'
            '        Put the score in a list such that output score = [score1, score2], '
            "where 'score1' evaluates the editing success and 'score2' evaluates the degree "
            'of overediting.\n'
            '\n'
            '        Editing instruction: ${instruction}\n'
            '        '
        ),
    ),
    'score2': (
        Template(
            'You are a professional digital artist. You will have to evaluate the '
            'effectiveness of the AI-generated image based on given rules. Strictly adhere '
            'to the requested JSON output format.'
        ),
        Template(
            _SCORE_FORMAT +
            '\n'
            '        The image is an AI-generated image.\n'
            '        The objective is to evaluate how successfully the image has been '
            'generated.\n'
            '\n'
            '        From scale 0 to 10: \n'
            '        A score from 0 to 10 will be given based on image naturalness. \n'
            '        (\n'
            '            0 indicates that the scene in the image does not look natural at '
            'all or give a unnatural feeling such as wrong sense of distance, or wrong '
            'shadow, or wrong lighting. \n'
            '            10 indicates that the image looks natural.\n'
            '        )\n'
            '        A second score from 0 to 10 will rate the image artifacts. \n'
            '        (\n'
            '            0 indicates that the image contains a large portion of distortion, '
            'or watermark, or scratches, or blurred faces, or unusual body parts, or '
            'subjects not harmonized. \n'
            '            10 indicates the image has no artifacts.\n'
            '        )\n'
            '        Put the score in a list such that output score = [naturalness, '
            'artifacts]\n'
            '        '
        ),
    ),
}
