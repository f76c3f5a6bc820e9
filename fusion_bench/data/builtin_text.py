"""A small English text that ships with fusion_bench, for offline calibration and perplexity.

Licence: CC0 1.0 (public domain dedication). The text was written for this project (it is not
taken from any corpus or book) and may be used, copied and changed without condition.

It is about 24 KB of varied prose (a fictional town's history, science explanations, a recipe,
a letter, minutes of a meeting, dialogue, short narratives), one paragraph per block separated
by blank lines. ``load_texts("builtin")`` returns the paragraphs; ``split="train"`` and
``split="test"`` give a fixed, disjoint partition (every fifth paragraph is test), so calibration
data and evaluation data need not overlap.
"""

LICENSE = "CC0-1.0"

TEXT = """\
The harbour town of Kelmouth sits at the mouth of a slow brown river, and for most of its history it has lived by the tide. Twice a day the water climbs the stone steps of the quay and twice a day it falls away again, leaving the fishing boats tilted on the mud like sleeping animals. The older residents still measure their afternoons by the height of the water rather than by the clock on the church tower, which has been running seven minutes fast since anyone can remember.

In the early years the town was little more than a row of wooden sheds where salt was boiled out of seawater in iron pans. The salt was packed into barrels and carried inland on carts, and the money that came back paid for the first stone houses on the hill. A chapel followed, then a school with a single room, and finally a market hall whose roof was made from the timbers of a ship that had run aground on the sandbar during a winter storm.

Trade changed the shape of the streets. Merchants built tall narrow houses with storerooms on the ground floor and living rooms above, so that a family could watch the harbour from the windows while their goods waited below. The lanes between the houses were kept deliberately narrow, partly to save land and partly to break the force of the wind that came off the sea in autumn. Visitors often complain that they get lost within ten minutes of arriving, and the locals take a quiet pride in this.

When the railway reached the valley the river trade declined, and for a generation the town grew poorer. Young people left for the cities, and several of the merchant houses stood empty with their shutters closed. What saved Kelmouth in the end was not a new industry but an old habit: the townspeople had never stopped holding their summer fair, and painters who came for the fair began to stay for the light. Within twenty years there were more studios than fishing boats, although the fishing boats never disappeared entirely.

Today the population is about four thousand, rising to nearly ten thousand in August. The salt pans are gone, but a small museum keeps one of the iron pans on display beside a ledger in which a clerk recorded, in careful brown ink, every barrel that left the quay in the year the market hall was built. The ledger shows that the busiest month was October, when the herring came close to shore and salt was needed to preserve them.

Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical energy. Inside the leaf, light is absorbed by pigments, chiefly chlorophyll, which sit in the membranes of small structures called chloroplasts. The absorbed energy is used to split water molecules, releasing oxygen as a by-product, and to build energy-carrying molecules that the cell can spend later.

In a second set of reactions the plant uses that stored energy to take carbon dioxide from the air and fix it into sugars. These reactions do not need light directly, which is why they were once called the dark reactions, although in practice they run mostly during the day when the energy carriers are plentiful. The sugars become the raw material for almost everything else the plant makes, from the cellulose of its cell walls to the oils in its seeds.

The rate of photosynthesis depends on several factors at once. More light increases the rate up to a point, after which the machinery is saturated and extra light only causes damage. Temperature matters because the enzymes involved work best within a certain range. The concentration of carbon dioxide can also limit the process, which is why some commercial greenhouses deliberately enrich their air with it. A plant in the real world is usually limited by whichever factor is in shortest supply at that moment.

It is worth remembering how large the effect of this single process is. Nearly all the oxygen in the atmosphere was produced by photosynthetic organisms over billions of years, and nearly all the food eaten by animals, including people, can be traced back to sugars made in a leaf or in a single-celled alga floating near the surface of the ocean. Coal, oil and natural gas are the buried remains of such organisms, so even the energy that powers a car was once sunlight.

To make a simple loaf of bread you need flour, water, salt and yeast, and very little else. Mix about five hundred grams of strong white flour with ten grams of salt and seven grams of dried yeast in a large bowl, keeping the salt and yeast on opposite sides at first. Add roughly three hundred and twenty millilitres of lukewarm water and stir until a rough dough forms and no dry flour remains at the bottom of the bowl.

Turn the dough out onto a lightly floured surface and knead it for eight to ten minutes. Push it away from you with the heel of your hand, fold it back over itself, turn it a quarter turn and repeat. At first it will feel sticky and uneven, but gradually it becomes smooth and elastic, and when you press it with a finger the dent should slowly spring back. Resist the temptation to add too much extra flour, since a slightly wet dough usually makes a lighter loaf.

Place the dough in an oiled bowl, cover it with a clean cloth and leave it somewhere warm until it has roughly doubled in size. This can take an hour in a warm kitchen or three hours in a cool one; the time matters less than the change in volume. Then knock the air out, shape it into a tight oval and put it into a greased tin. Let it rise again for about forty minutes while the oven heats to two hundred and twenty degrees.

Bake the loaf for thirty to thirty-five minutes, until the crust is deep golden brown and the bottom sounds hollow when tapped. Take it out of the tin straight away and let it cool on a wire rack, because bread left in a hot tin will steam and turn soggy underneath. It is hard to wait, but the crumb finishes setting as it cools, and a loaf cut too early will be gummy in the middle.

Dear Margaret, thank you for your letter, which arrived on Tuesday together with the seeds. I planted the beans along the south fence the very next morning, and the children insisted on marking each one with a stick so that they could check on them every day. So far nothing has come up, but the weather has been cold and I am told that beans sulk until the soil warms.

The house is finally starting to feel like ours. We painted the kitchen a pale yellow, which looked alarming in the tin but turned out to be exactly right on the walls, and your old dresser fits in the corner as if it had been built for it. The only room we have not touched is the attic, which is full of boxes left by the previous owners. Tom says he will sort them out in the spring, and I say he said that last spring as well.

Work is busy but pleasant. The library has started opening on Saturday afternoons, and I volunteered to cover them for the first two months. It is mostly parents with small children and a few students who want a quiet place to revise, but last week an elderly man came in asking for a book about the lighthouses of the northern coast, and we spent an hour looking through the local history shelves together. He told me his father had kept one of them for thirty years.

Please give my love to everyone, and tell Daniel that his drawing of the dog is pinned above my desk. We hope to visit in the summer if the car survives its inspection. Write soon and tell me how the new job is going. With love, Ellen.

A glacier is a large mass of ice that forms on land and moves slowly under its own weight. It begins where more snow falls in winter than melts in summer, so that each year's layer is buried by the next. Over decades the buried snow is compressed, the air is squeezed out, and the crystals grow and fuse together until the material becomes dense blue ice.

Once the ice is thick enough it begins to flow. Part of the movement comes from the ice itself deforming, like very stiff toffee, and part from the whole glacier sliding over its bed on a thin film of meltwater. The speed varies enormously: some glaciers creep forward a few metres a year, while others in steep valleys can move more than a kilometre in the same time.

As a glacier moves it carries rock with it, plucking boulders from the valley floor and grinding smaller stones into fine powder. This debris is what gives glacial rivers their milky colour, and it is also how glaciers carve the landscape. Valleys shaped by ice have a broad U-shaped profile, quite different from the narrow V cut by a river, and many mountain lakes sit in hollows that glaciers scooped out during the last ice age.

The committee met on a wet Thursday evening in the back room of the village hall. There were eleven people present, which the chair pointed out was three more than the previous meeting, and she suggested that the increase might have something to do with the item on the agenda about the car park. The minutes of the last meeting were read and approved, with one correction: the hedge that had been described as overgrown was in fact on the council's land and not on the churchyard's.

Discussion of the car park took most of the hour. One member argued that the lines should be repainted so that more cars could fit, another that fewer cars should be encouraged in the first place, and a third wanted to know who had been parking a trailer in the corner since the harvest festival. No decision was reached, but it was agreed that the treasurer would obtain two quotes for the painting and that someone would speak to the owner of the trailer, once the owner could be identified.

Under any other business, a resident raised the question of the bus timetable, which had been changed without notice so that the last bus from town now left at a quarter past six. Several people said this made it impossible to go to the cinema or to attend evening classes. The chair promised to write to the bus company, and the secretary noted that a letter written on behalf of the whole committee was more likely to be answered than eleven separate complaints.

The meeting closed at nine o'clock. Tea was served, and the biscuits, as usual, ran out before the tea did.

Computers store numbers in binary, a system that uses only two digits, zero and one. Each digit is called a bit, and a group of eight bits is called a byte. A single byte can represent two hundred and fifty-six different values, which is enough to store a letter of the English alphabet, a small whole number, or one of the three colour channels of a pixel in an ordinary photograph.

Whole numbers are easy to represent: each position in a binary number is worth twice the position to its right, just as each position in a decimal number is worth ten times the one to its right. Fractions are harder. Most computers use a format called floating point, in which a number is stored as a sign, a set of significant digits and an exponent that says where the binary point goes. This lets a fixed number of bits cover both very small and very large values, at the cost of some precision.

The loss of precision has practical consequences. Adding a very small number to a very large one may leave the large number unchanged, because the small one falls below the last digit that can be stored. Adding up the same list of numbers in a different order can give a slightly different total. Programmers who work with money usually avoid floating point for this reason and count in whole cents instead.

Modern machine learning has made these details newly important. Large neural networks contain billions of numbers, and storing each in thirty-two bits uses a great deal of memory. Researchers have found that many of these numbers can be stored in sixteen bits, or eight, or in some cases even fewer, with little effect on the network's behaviour. Choosing how many bits to spend on each number has become part of the craft of building such systems.

The old mill stood where the stream dropped over a ledge of grey rock, and for two hundred years its wheel turned whenever there was enough water to turn it. Farmers brought their grain from miles around, and while they waited for it to be ground they sat on the low wall outside and exchanged news. It was said that nothing happened in the district that was not discussed on that wall within a week.

The miller was an important person, and not always a popular one. He kept a share of every sack as payment, and there were frequent suspicions that his share was larger than it should be. One miller in the last century was so distrusted that the farmers clubbed together to buy a set of scales, which they kept in a locked box and brought out whenever their grain was weighed. The scales are still in the mill, although the box has long since lost its lock.

When steam-powered mills were built in the towns, the little mill could not compete on price, and it closed a few years before the war. The wheel rotted, the roof fell in, and for a long time the building was used only by swallows. It was restored by a group of volunteers who spent eight summers rebuilding the machinery from old drawings and photographs, and on the day the wheel turned again half the village came to watch.

"Are you sure this is the right road?" asked Priya, looking at the map and then at the empty hills.

"Fairly sure," said her brother. "The sign said the farm was eight miles from the junction, and we've done about six."

"The sign also had a bullet hole in it. I'm not sure I trust it."

"That doesn't make it wrong. Look, there's a gate up ahead. If it says Highfield on it, we're fine."

They drove on in silence for a minute. The gate, when they reached it, said nothing at all, but a handwritten card had been tied to it with string: Eggs, honey, ring the bell. There was no bell.

"Well," said Priya, "at least someone lives here."

"Someone who sells honey. That's a good sign. People who keep bees are usually patient with strangers."

"Where did you read that?"

"I didn't read it anywhere. I'm just hoping it's true."

Tides are caused mainly by the gravitational pull of the Moon, with a smaller contribution from the Sun. The Moon pulls slightly harder on the side of the Earth that faces it than on the Earth's centre, and slightly harder on the centre than on the far side. The result is a stretching of the oceans along the line joining the Earth and the Moon, producing two bulges of water, one facing the Moon and one facing away from it.

As the Earth rotates, a given stretch of coast passes through both bulges each day, which is why most places have two high tides and two low tides roughly every twenty-four hours and fifty minutes. The extra fifty minutes come from the Moon's own movement along its orbit: by the time the Earth has turned once, the Moon has moved on, and the coast must turn a little further to catch up with it.

When the Sun and Moon are in line, at new moon and full moon, their effects add together and the tides are larger than usual. These are called spring tides, although they have nothing to do with the season. When the Sun and Moon are at right angles, at the quarter moons, their effects partly cancel and the range between high and low water is smaller. These weaker tides are called neap tides.

The shape of the coast can change the picture dramatically. In the open ocean the tidal range is often less than a metre, but in a funnel-shaped bay the water can pile up to heights of ten metres or more. In some narrow estuaries the incoming tide arrives as a single wave, called a bore, which travels upstream against the current of the river and attracts surfers who hope to ride it for miles.

Before you plant a vegetable garden, spend a little time watching the plot. Notice where the sun falls in the morning and where the shadows lie in the late afternoon, which corners stay wet after rain and which dry out first. Most vegetables want at least six hours of direct sunlight a day, and a bed that looks sunny in June may spend much of April in the shade of a neighbour's tree.

Good soil matters more than any single clever technique. Dig in plenty of well-rotted compost or manure in the autumn, so that worms have the winter to work it through. Heavy clay benefits from organic matter because it opens up the structure and lets water drain; sandy soil benefits because the same material holds water and nutrients that would otherwise wash straight through. Either way, avoid walking on the beds once they are prepared, since trampled soil packs down and roots struggle to push through it.

Start with a few crops that are forgiving. Radishes, lettuce, beans and courgettes all grow quickly and give a new gardener the encouragement of an early harvest. Potatoes are useful on new ground because the work of planting and lifting them breaks up the soil. Leave the more demanding crops, such as celery and cauliflower, until you have a season or two of experience and a better sense of how your particular patch behaves.

Keep a notebook. Write down what you planted, when, and where, and add a line whenever something goes well or badly. Gardeners have long memories for their triumphs and short ones for their mistakes, and a notebook is the only reliable way to learn from both.

The first public lending library in the town opened in a former grocer's shop with about six hundred books, most of them donated. Borrowers paid a small subscription and were allowed to take out one book at a time for a fortnight. The librarian, a retired schoolmaster, kept the catalogue in a set of exercise books and was known to refuse a loan if he felt the book was unsuitable for the borrower, which caused a certain amount of friction.

Within ten years the collection had outgrown the shop, and a new building was paid for by a combination of public subscription and a gift from a local manufacturer. The manufacturer asked that his name be carved above the door, and it still is, although most people who pass under it have no idea who he was. Inside there was a reading room with long oak tables, where newspapers were laid out each morning and silence was enforced with great seriousness.

The way the library is used has changed many times since then. Record lending came and went, then videos, then computers with internet access, which at first were booked in half-hour slots and had queues on Saturday mornings. Today the busiest part of the building is the children's corner, and the reading room is used as much for job interviews and study groups as for reading. The oak tables are still there, scratched and polished by more than a century of elbows.

Sound is a wave of pressure that travels through a material such as air, water or steel. When a guitar string vibrates, it pushes on the air next to it, squeezing the molecules together and then letting them spread apart. Those molecules push on their neighbours, and the disturbance passes outward, even though each molecule only moves back and forth a tiny distance around its starting point.

The speed of sound depends on the material. In air at room temperature it is about three hundred and forty metres per second, which is why you can estimate the distance of a thunderstorm by counting the seconds between the lightning and the thunder: every three seconds is roughly a kilometre. In water sound travels more than four times faster, and in steel faster still, because the particles in these materials are more tightly coupled to one another.

The pitch of a sound is set by its frequency, the number of pressure waves that pass a point each second. People with good hearing can detect frequencies from about twenty to twenty thousand cycles per second, although the upper limit falls steadily with age. Dogs and bats hear much higher frequencies, and elephants communicate partly with rumbles too low for human ears to register at all.

Loudness is a different matter from pitch. It depends on how large the pressure changes are, and because the ear can handle an enormous range, from the faint rustle of leaves to the roar of a jet engine, loudness is usually measured on a logarithmic scale in decibels. An increase of ten decibels corresponds to ten times the sound energy, though it sounds to most listeners roughly twice as loud.

On the morning of the race the fog was so thick that the starter could not see the end of the first straight. The runners stood in a loose crowd behind the line, stamping their feet and blowing on their hands, and there was a long argument among the officials about whether to wait. In the end they decided that the course was marked clearly enough, and at half past nine the gun went off into the grey.

For the first mile nobody could see more than twenty metres ahead, and the field stayed bunched together, each runner following the shape of the one in front. Then the road began to climb, the fog thinned, and suddenly the leaders came out into bright sunshine with the whole valley spread below them like a bowl of milk. Several of them said afterwards that they nearly stopped to look.

The winner was a schoolteacher from a neighbouring town who had entered the race every year for a decade without finishing higher than fifth. She said she had no particular plan except to run steadily and to save something for the last hill, which was where the younger runners usually faded. When she crossed the line she asked what her time was, and when she was told she laughed and said that it was the slowest she had ever run the course.

A good map is a set of careful decisions about what to leave out. A map that showed every tree, every fence post and every change in the colour of the grass would be as large as the land itself and about as useful. The mapmaker chooses a purpose, whether that is driving, walking, sailing or planning a new railway, and keeps only the features that serve it.

Scale is the first of these decisions. On a map at one to twenty-five thousand, a centimetre on the paper stands for two hundred and fifty metres on the ground, which is enough detail to show individual buildings and footpaths. On a map at one to a million, the same centimetre stands for ten kilometres, and a whole city becomes a small yellow patch. Neither scale is better; each answers different questions.

Height is harder to show on a flat sheet. Older maps used hatching, fine lines drawn down the slopes, which gave a vivid impression of the terrain but made precise reading difficult. Most modern maps use contour lines instead, each joining points of equal height. Where the lines crowd together the ground is steep, and where they spread apart it is gentle. With practice a walker can look at the contours and picture the shape of a hill before climbing it.

Winter came early that year. By the middle of November the pond behind the school had frozen hard enough for the ducks to walk on it, looking puzzled, and the caretaker spent his mornings scattering salt on the steps. The children were told every day not to go onto the ice, and every day at least one of them was found standing at the edge with one boot on it, testing.

The heating in the old building could not keep up. Classes were held in coats, and the teachers took turns bringing in flasks of soup for the staff room. One afternoon the pipes in the science laboratory burst, and a thin sheet of water spread across the floor and froze into a perfect miniature skating rink before anyone noticed. The headmistress closed the room, but not before several photographs had been taken.

When the thaw finally came in March it came all at once. The snow slid off the roofs in great wet slabs, the gutters overflowed, and the stream at the bottom of the playing field rose so high that it carried away the goalposts. They were found a week later two fields downstream, lodged against a hedge, and were carried back in triumph by the under-twelves football team.
"""
